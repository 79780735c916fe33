//! [`EndpointLog`]: the in-memory image of one endpoint's log and the group commit of its changes.
//! Pure: no client, no clock.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde_json::Value;
use tracing::warn;

use super::record::{self, DeliveryRecord, DeliveryState, is_valid_key, truncate_error};
use super::{GROWTH_RESERVE, HARD_SEGMENT_BYTES, MAX_RECORD_BYTES, MAX_SEGMENT_BYTES, segment_labels, segment_name};

/// Bounds of one endpoint's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// Finished (succeeded or failed) records kept; older ones are pruned. Pending ones are always kept.
    pub max_finished: usize,
    /// A segment is full when a new record would take it above this many bytes (keys plus values;
    /// at most [`MAX_SEGMENT_BYTES`]).
    pub segment_bytes: usize,
    /// Most segments (ConfigMaps) one endpoint's log may have; inserting beyond is [`LogFull`].
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

/// The log cannot take another record: every segment allowed is full (or the record alone is
/// larger than [`MAX_RECORD_BYTES`], or its id is not a valid ConfigMap key). Ingest answers 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the delivery log of this endpoint is full")]
pub struct LogFull;

/// One API write of a batch.
// A batch holds a handful of these: the variants' size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum SegmentWrite {
    /// Create a segment with all its records.
    Create(ConfigMap),
    /// JSON merge patch `{"data": {...}}` of the changed keys only; removed keys are `null`.
    Patch {
        /// The segment's ConfigMap name.
        name: String,
        /// The merge patch.
        patch: Value,
    },
    /// Delete a segment that no longer holds records.
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
            SegmentWrite::Patch { name, .. } | SegmentWrite::Delete { name } => name,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteKind {
    Create,
    Patch,
    Delete,
}

/// What one write covers, to hand it back on failure.
#[derive(Clone, Debug)]
struct Touched {
    seq: u64,
    name: String,
    kind: WriteKind,
    /// Ids whose current record the write stores.
    written: Vec<String>,
    /// Ids the write removes.
    removed: Vec<String>,
}

/// A batch of writes from [`EndpointLog::take_writes`]: at most one per touched segment, creates
/// first, then patches, then deletes. Apply them in order; on failure give the batch back with
/// [`EndpointLog::restore`].
#[derive(Clone, Debug, Default)]
pub struct PendingWrites {
    writes: Vec<SegmentWrite>,
    touched: Vec<Touched>,
}

impl PendingWrites {
    /// The writes, in the order to apply them.
    pub fn writes(&self) -> &[SegmentWrite] {
        &self.writes
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
        self.touched.iter().flat_map(|t| t.written.iter().map(String::as_str))
    }

    /// Ids of the records these writes remove (pruned records).
    pub fn removed_ids(&self) -> impl Iterator<Item = &str> {
        self.touched.iter().flat_map(|t| t.removed.iter().map(String::as_str))
    }
}

/// One segment as the image sees it (for metrics and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentSummary {
    /// ConfigMap name.
    pub name: String,
    /// Ids of its records, sorted.
    pub ids: Vec<String>,
    /// Its data's size: keys plus values.
    pub bytes: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SegmentState {
    /// Never written: the next batch creates it with all its records.
    New,
    /// A write of it may have failed: it may or may not exist, with unknown content. The next batch
    /// creates it with all its records (a conflict turns into a merge patch); keys removed since
    /// stay dirty and are nulled by the batch after.
    Uncertain,
    /// Exists as last written; `dirty` lists the keys changed since.
    Persisted,
    /// A delete of it may have failed: the next batch deletes it again. Takes no records.
    Deleting,
}

#[derive(Clone, Debug)]
struct Segment {
    name: String,
    state: SegmentState,
    ids: BTreeSet<String>,
    /// Keys plus values of its records (and of undecodable keys found by a recovery).
    bytes: usize,
    /// `bytes` plus [`GROWTH_RESERVE`] per pending record: decides whether a new record fits.
    projected: usize,
    /// Keys changed since the last batch, each with whether it may exist on the server (so that
    /// its removal has to be written). Unused while `New`: the create carries everything.
    dirty: BTreeMap<String, bool>,
}

impl Segment {
    fn new(name: String, state: SegmentState) -> Self {
        Self {
            name,
            state,
            ids: BTreeSet::new(),
            bytes: 0,
            projected: 0,
            dirty: BTreeMap::new(),
        }
    }

    /// Notes that `id` left this segment.
    fn mark_removed(&mut self, id: &str) {
        match self.dirty.get(id) {
            // Added since the last batch: it never reached the server.
            Some(false) => {
                self.dirty.remove(id);
            }
            _ => {
                self.dirty.insert(id.to_string(), true);
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    record: DeliveryRecord,
    seq: u64,
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
    segments: BTreeMap<u64, Segment>,
    /// Finished records by (updated_at, id): the first is pruned first.
    finished: BTreeSet<(Timestamp, String)>,
    pending: usize,
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
            finished: BTreeSet::new(),
            pending: 0,
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
    /// Never fails: an undecodable key is skipped with a warning (and left in place); a record found
    /// in several segments keeps its newest copy (by `updated_at`) and the others are removed by the
    /// next batch; segments owned by another incarnation of the endpoint (another uid) are skipped.
    /// Retention applies at once, so the next batch may prune.
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
            log.segments
                .insert(seq, Segment::new(name.clone(), SegmentState::Persisted));
            for (key, value) in cm.data.unwrap_or_default() {
                let mut record = match DeliveryRecord::from_stored(&value) {
                    Ok(r) if r.id == key => r,
                    Ok(r) => {
                        warn!(configmap = %name, key = %key, id = %r.id, "record id differs from its key; ignored");
                        log.add_foreign(seq, key.len() + value.len());
                        continue;
                    }
                    Err(error) => {
                        warn!(configmap = %name, key = %key, %error, "undecodable delivery record; ignored");
                        log.add_foreign(seq, key.len() + value.len());
                        continue;
                    }
                };
                record.normalize();
                if let Some(existing) = log.records.get(&key) {
                    warn!(configmap = %name, key = %key, "delivery record found in two segments; keeping the newest");
                    if record.updated_at < existing.record.updated_at {
                        // This copy is stale: remove it from this segment.
                        log.segment_mut(seq).mark_removed(&key);
                        continue;
                    }
                    let old = log.detach(&key).expect("present");
                    log.segment_mut(old.seq).mark_removed(&key);
                }
                let bytes = record.stored_len();
                log.attach(seq, record, bytes);
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

    /// Adds a new record (one with a known id is updated instead). It goes into the newest segment
    /// if it fits, else into a new segment; at [`LogConfig::max_segments`] into any older segment
    /// with room, else [`LogFull`].
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
        let seq = self.segment_for(bytes + reserve(record.state))?;
        let id = record.id.clone();
        self.attach(seq, record, bytes);
        let segment = self.segment_mut(seq);
        if segment.state != SegmentState::New {
            segment.dirty.entry(id).or_insert(false);
        }
        self.prune();
        Ok(())
    }

    /// Replaces a record in place (same segment). Returns false, changing nothing, if the log has
    /// no record with its id (never inserted, or pruned). Should the segment's data get above
    /// [`HARD_SEGMENT_BYTES`], the record's `last_error` is shortened until it fits.
    pub fn update(&mut self, mut record: DeliveryRecord) -> bool {
        record.normalize();
        let Some(old) = self.detach(&record.id) else {
            return false;
        };
        let seq = old.seq;
        let room = HARD_SEGMENT_BYTES.saturating_sub(self.segment_mut(seq).bytes);
        let bytes = shorten_error_to_fit(&mut record, room);
        let id = record.id.clone();
        self.attach(seq, record, bytes);
        let segment = self.segment_mut(seq);
        if segment.state != SegmentState::New {
            segment.dirty.entry(id).or_insert(true);
        }
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

    /// Bytes of all segments' data (keys plus values), as last changed in memory.
    pub fn approx_bytes(&self) -> usize {
        self.segments.values().map(|s| s.bytes).sum()
    }

    /// Segments holding records.
    pub fn segment_count(&self) -> usize {
        self.segments.values().filter(|s| !s.ids.is_empty()).count()
    }

    /// Segments holding records, oldest first.
    pub fn segments(&self) -> Vec<SegmentSummary> {
        self.segments
            .values()
            .filter(|s| !s.ids.is_empty())
            .map(|s| SegmentSummary {
                name: s.name.clone(),
                ids: s.ids.iter().cloned().collect(),
                bytes: s.bytes,
            })
            .collect()
    }

    /// Whether [`Self::take_writes`] would return writes.
    pub fn has_changes(&self) -> bool {
        self.segments.values().any(|s| match s.state {
            SegmentState::New | SegmentState::Uncertain | SegmentState::Deleting => true,
            SegmentState::Persisted => s.ids.is_empty() || !s.dirty.is_empty(),
        })
    }

    /// Everything changed since the previous call, as at most one write per touched segment:
    /// creates (new segments with all their records), then merge patches of the changed keys, then
    /// deletes of emptied segments. The image assumes they will be applied; if applying fails, hand
    /// them back with [`Self::restore`].
    pub fn take_writes(&mut self) -> PendingWrites {
        let mut creates = Vec::new();
        let mut patches = Vec::new();
        let mut deletes = Vec::new();
        let mut touched = Vec::new();
        let seqs: Vec<u64> = self.segments.keys().copied().collect();
        for seq in seqs {
            let segment = &self.segments[&seq];
            let kind = match segment.state {
                SegmentState::New | SegmentState::Uncertain if !segment.ids.is_empty() => WriteKind::Create,
                SegmentState::New => {
                    self.segments.remove(&seq);
                    continue;
                }
                _ if segment.ids.is_empty() => WriteKind::Delete,
                SegmentState::Persisted if !segment.dirty.is_empty() => WriteKind::Patch,
                _ => continue,
            };
            let name = segment.name.clone();
            match kind {
                WriteKind::Create => {
                    let data: BTreeMap<String, String> = segment
                        .ids
                        .iter()
                        .map(|id| (id.clone(), self.records[id].record.to_stored()))
                        .collect();
                    let written: Vec<String> = data.keys().cloned().collect();
                    creates.push(SegmentWrite::Create(self.configmap(&name, data)));
                    let segment = self.segment_mut(seq);
                    segment.state = SegmentState::Persisted;
                    let ids = &segment.ids;
                    segment.dirty.retain(|id, may_exist| *may_exist && !ids.contains(id));
                    touched.push(Touched {
                        seq,
                        name,
                        kind,
                        written,
                        removed: Vec::new(),
                    });
                }
                WriteKind::Patch => {
                    let dirty = std::mem::take(&mut self.segment_mut(seq).dirty);
                    let mut data = serde_json::Map::new();
                    let (mut written, mut removed) = (Vec::new(), Vec::new());
                    for id in dirty.into_keys() {
                        match self.records.get(&id) {
                            Some(entry) if entry.seq == seq => {
                                data.insert(id.clone(), Value::String(entry.record.to_stored()));
                                written.push(id);
                            }
                            _ => {
                                data.insert(id.clone(), Value::Null);
                                removed.push(id);
                            }
                        }
                    }
                    let patch = serde_json::json!({ "data": data });
                    patches.push(SegmentWrite::Patch {
                        name: name.clone(),
                        patch,
                    });
                    touched.push(Touched {
                        seq,
                        name,
                        kind,
                        written,
                        removed,
                    });
                }
                WriteKind::Delete => {
                    let segment = self.segments.remove(&seq).expect("present");
                    deletes.push(SegmentWrite::Delete { name: name.clone() });
                    let removed = segment.dirty.into_keys().collect();
                    touched.push(Touched {
                        seq,
                        name,
                        kind,
                        written: Vec::new(),
                        removed,
                    });
                }
            }
        }
        creates.extend(patches);
        creates.extend(deletes);
        PendingWrites {
            writes: creates,
            touched,
        }
    }

    /// Takes back a batch whose writes failed (all or some: which ones is unknown), so that the next
    /// batch writes it again: a segment it created or patched is written whole by a create (a
    /// conflict turns into a merge patch; a segment deleted behind our back is recreated), keys it
    /// removed are removed again, and a segment it deleted is deleted again.
    pub fn restore(&mut self, writes: PendingWrites) {
        for touched in writes.touched {
            match touched.kind {
                WriteKind::Create | WriteKind::Patch => {
                    let Some(segment) = self.segments.get_mut(&touched.seq) else {
                        continue;
                    };
                    if segment.state != SegmentState::Deleting {
                        segment.state = SegmentState::Uncertain;
                    }
                    for id in touched.written.into_iter().chain(touched.removed) {
                        segment.dirty.insert(id, true);
                    }
                }
                WriteKind::Delete => {
                    self.segments
                        .entry(touched.seq)
                        .or_insert_with(|| Segment::new(touched.name, SegmentState::Deleting));
                }
            }
        }
    }

    fn segment_budget(&self) -> usize {
        self.config.segment_bytes.clamp(1, MAX_SEGMENT_BYTES)
    }

    fn segment_mut(&mut self, seq: u64) -> &mut Segment {
        self.segments.get_mut(&seq).expect("segment of a known record")
    }

    /// The segment a new record needing `need` projected bytes goes into, made if needed.
    fn segment_for(&mut self, need: usize) -> Result<u64, LogFull> {
        let budget = self.segment_budget();
        let fits =
            |s: &Segment| s.state != SegmentState::Deleting && (s.ids.is_empty() || s.projected + need <= budget);
        let newest = self
            .segments
            .iter()
            .rev()
            .find(|(_, s)| s.state != SegmentState::Deleting);
        if let Some((&seq, segment)) = newest
            && fits(segment)
        {
            return Ok(seq);
        }
        if self.segment_count() < self.config.max_segments.max(1) {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.segments
                .insert(seq, Segment::new(segment_name(&self.endpoint, seq), SegmentState::New));
            return Ok(seq);
        }
        // At the segment limit: an older segment with room will do.
        self.segments
            .iter()
            .rev()
            .find(|(_, s)| fits(s))
            .map(|(&seq, _)| seq)
            .ok_or(LogFull)
    }

    /// Puts a record into a segment's accounting (not its dirty set).
    fn attach(&mut self, seq: u64, record: DeliveryRecord, bytes: usize) {
        let segment = self.segment_mut(seq);
        segment.ids.insert(record.id.clone());
        segment.bytes += bytes;
        segment.projected += bytes + reserve(record.state);
        if record.is_finished() {
            self.finished.insert((record.updated_at, record.id.clone()));
        } else {
            self.pending += 1;
        }
        self.records.insert(record.id.clone(), Entry { record, seq, bytes });
    }

    /// Takes a record out of the image's accounting (not its segment's dirty set); the segment stays.
    fn detach(&mut self, id: &str) -> Option<Entry> {
        let entry = self.records.remove(id)?;
        if entry.record.is_finished() {
            self.finished
                .remove(&(entry.record.updated_at, entry.record.id.clone()));
        } else {
            self.pending -= 1;
        }
        let segment = self.segment_mut(entry.seq);
        segment.ids.remove(id);
        segment.bytes -= entry.bytes;
        segment.projected -= entry.bytes + reserve(entry.record.state);
        Some(entry)
    }

    fn add_foreign(&mut self, seq: u64, bytes: usize) {
        let segment = self.segment_mut(seq);
        segment.bytes += bytes;
        segment.projected += bytes;
    }

    /// Removes a record; a segment that was never written and is now empty disappears at once.
    fn remove(&mut self, id: &str) {
        let Some(entry) = self.detach(id) else {
            return;
        };
        let segment = self.segment_mut(entry.seq);
        if segment.state == SegmentState::New {
            if segment.ids.is_empty() {
                self.segments.remove(&entry.seq);
            }
        } else {
            segment.mark_removed(id);
        }
    }

    /// Retention: finished records beyond the newest `max_finished` (by `updated_at`) go.
    fn prune(&mut self) {
        while self.finished.len() > self.config.max_finished {
            let Some((_, id)) = self.finished.first().cloned() else {
                break;
            };
            self.remove(&id);
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

/// Shortens `record.last_error` until its stored size is at most `room` (or nothing is left to
/// cut); returns the stored size.
fn shorten_error_to_fit(record: &mut DeliveryRecord, room: usize) -> usize {
    let mut bytes = record.stored_len();
    if bytes > room && record.last_error.is_some() {
        warn!(id = %record.id, bytes, room, "delivery-log segment near its size limit: shortening last_error");
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
