//! Unit tests of the image, against a fake API server that applies writes the way the real one does.

use std::collections::BTreeMap;

use super::*;
use crate::delivery_log::fake::FakeServer;
use crate::delivery_log::record::tests::{LEGACY_RECORD, record, ts};
use crate::delivery_log::{MAX_ERROR_CHARS, journal_seq, legacy_segment_name};
use crate::resources::{COMPONENT_LABEL, MANAGED_BY_LABEL, ORGANIZATION_LABEL};

fn config(max_finished: usize, segment_bytes: usize, max_segments: usize) -> LogConfig {
    LogConfig {
        max_finished,
        segment_bytes,
        max_segments,
    }
}

fn new_log(config: LogConfig) -> DeliveryLog {
    DeliveryLog::new("ns1", "org_1", config)
}

fn recover(server: &FakeServer, config: LogConfig) -> DeliveryLog {
    DeliveryLog::from_configmaps("ns1", "org_1", config, server.configmaps())
}

/// Commits the image's changes to the server; returns the number of writes.
fn commit(log: &mut DeliveryLog, server: &mut FakeServer) -> usize {
    let writes = log.take_writes();
    server.apply(&writes, None).unwrap();
    writes.len()
}

fn id(n: u32) -> String {
    record(n, DeliveryState::Pending).id
}

fn ids(ns: impl IntoIterator<Item = u32>) -> Vec<String> {
    let mut ids: Vec<String> = ns.into_iter().map(id).collect();
    ids.sort();
    ids
}

fn names(writes: &PendingWrites) -> Vec<(&str, bool)> {
    writes
        .writes()
        .iter()
        .map(|w| (w.name(), matches!(w, SegmentWrite::Create(_))))
        .collect()
}

fn created(writes: &PendingWrites) -> Vec<&ConfigMap> {
    writes
        .writes()
        .iter()
        .filter_map(|w| match w {
            SegmentWrite::Create(cm) => Some(cm),
            SegmentWrite::Delete { .. } => None,
        })
        .collect()
}

/// The entries a segment stores (packed or not).
fn entries(cm: &ConfigMap) -> BTreeMap<String, String> {
    crate::delivery_log::segment_entries(cm).unwrap()
}

/// Keys plus values of a segment's entries (what the segment budget counts).
fn data_bytes(cm: &ConfigMap) -> usize {
    entries(cm).iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// A recovery from the server's ConfigMaps gives the image's records, pending count and finished
/// count (what survives a restart).
fn assert_records_recover(log: &DeliveryLog, server: &FakeServer) {
    let back = recover(server, log.config().clone());
    assert_eq!(
        back.records().collect::<Vec<_>>(),
        log.records().collect::<Vec<_>>(),
        "records recovered from the server"
    );
    assert_eq!(back.pending_count(), log.pending_count());
    assert_eq!(back.finished_count(), log.finished_count());
}

/// After a successful commit: a recovery from the server rebuilds the same image (records,
/// segments with their live ids and bytes, counts), the server holds exactly the image's
/// segments, each live record as the image has it, and nothing is left to write, but for one thing
/// the design allows: the batch may have created segments holding only records pruned before their
/// last version was stored (retired), and if no older segment holds a live record, the oldest of
/// them holds none: the next batch deletes them, and writes nothing else.
fn assert_in_sync(log: &DeliveryLog, server: &FakeServer) {
    assert_records_recover(log, server);
    let back = recover(server, log.config().clone());
    assert_eq!(back.segments(), log.segments(), "segments recovered from the server");
    let segments = log.segments();
    let names: Vec<String> = segments.iter().map(|s| s.name.clone()).collect();
    assert_eq!(names, server.names());
    for segment in &segments {
        let data = server.data(&segment.name);
        for id in &segment.ids {
            match log.get(id) {
                Some(record) => assert_eq!(data[id], record.to_stored(), "{id} in {}", segment.name),
                None => assert_eq!(
                    data[id].as_bytes(),
                    log.payload(id).map_or(ERASED_PAYLOAD.as_bytes(), |p| &p[..]),
                    "event {id}"
                ),
            }
        }
    }
    if log.has_changes() {
        let oldest = &segments[0];
        assert!(
            oldest.ids.is_empty(),
            "only an oldest segment without live records is left"
        );
        assert!(
            server.data(&oldest.name).keys().all(|id| log.get(id).is_none()),
            "it holds only pruned records"
        );
        let mut next = log.clone();
        let writes = next.take_writes();
        assert!(!writes.is_empty());
        assert!(writes.writes().iter().all(|w| matches!(w, SegmentWrite::Delete { .. })));
        assert!(!next.has_changes());
    }
}

fn finished(n: u32, state: DeliveryState, updated: i64) -> DeliveryRecord {
    let mut r = record(n, state);
    r.attempts = 1;
    r.updated_at = ts(updated);
    r.next_attempt_at = None;
    if state == DeliveryState::Succeeded {
        r.delivered_at = Some(ts(updated));
        r.response_status = Some(200);
    } else {
        r.response_status = Some(500);
        r.last_error = Some("HTTP 500".into());
    }
    r
}

/// A record made larger by a long event type (records hold no payload).
fn with_padding(n: u32, bytes: usize) -> DeliveryRecord {
    let mut r = record(n, DeliveryState::Pending);
    r.event_type = format!("database.{}", "p".repeat(bytes));
    r
}

/// A segment as another writer (or an earlier run) may have left it.
fn segment_cm(seq: u64, data: Vec<(String, String)>) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(journal_segment_name("org_1", seq)),
            namespace: Some("ns1".into()),
            labels: Some(segment_labels("org_1")),
            ..Default::default()
        },
        data: Some(data.into_iter().collect()),
        ..Default::default()
    }
}

#[test]
fn new_segments_carry_labels_and_every_changed_record() {
    let mut log = new_log(LogConfig::default());
    assert!(!log.has_changes());
    for n in 0..3 {
        log.insert(record(n, DeliveryState::Pending)).unwrap();
    }
    assert!(log.has_changes());
    let writes = log.take_writes();
    assert_eq!(writes.len(), 1, "a batch within the budget is one create");
    let SegmentWrite::Create(cm) = &writes.writes()[0] else {
        panic!("expected a create")
    };
    assert_eq!(cm.metadata.name.as_deref(), Some("org-1-dfc76549-journal-1"));
    assert_eq!(cm.metadata.namespace.as_deref(), Some("ns1"));
    let labels = cm.metadata.labels.as_ref().unwrap();
    assert_eq!(labels[MANAGED_BY_LABEL], "capy-webhooks");
    assert_eq!(labels[COMPONENT_LABEL], "delivery-log");
    assert_eq!(labels[ORGANIZATION_LABEL], "org_1");
    assert_eq!(labels.len(), 3, "no endpoint label: the log is the organization's");
    assert!(
        cm.metadata.owner_references.is_none(),
        "the dispatcher deletes what it wrote"
    );
    // Packed: one binaryData value, no data key per entry; data holds only the log's floor.
    assert_eq!(
        cm.data,
        Some(BTreeMap::from([(
            crate::delivery_log::segment::FLOOR_KEY.to_string(),
            "1".to_string()
        )]))
    );
    assert_eq!(
        cm.binary_data.as_ref().unwrap().keys().collect::<Vec<_>>(),
        [crate::delivery_log::JOURNAL_KEY]
    );
    let expected: BTreeMap<String, String> = (0..3)
        .map(|n| {
            let r = record(n, DeliveryState::Pending);
            (r.id.clone(), r.to_stored())
        })
        .collect();
    assert_eq!(entries(cm), expected);
    let mut stored: Vec<&str> = writes.record_ids().collect();
    stored.sort();
    assert_eq!(stored, ids(0..3));
    assert_eq!(
        log.segments(),
        [SegmentSummary {
            name: "org-1-dfc76549-journal-1".into(),
            ids: ids(0..3),
            bytes: data_bytes(cm),
        }]
    );
    assert_eq!(log.approx_bytes(), data_bytes(cm));
    assert!(!log.has_changes());
    assert!(log.take_writes().is_empty());
}

#[test]
fn a_batch_larger_than_segment_bytes_is_split_into_several_creates() {
    let budget = 8 * 1024;
    let mut log = new_log(config(100, budget, 16));
    let mut server = FakeServer::default();
    // Two-digit numbers: every record has the same size.
    let size = with_padding(10, 1000).stored_len();
    let per_segment = budget / size;
    assert!(per_segment >= 2);
    let count = 3 * per_segment as u32 + 1;
    for n in 10..10 + count {
        assert_eq!(with_padding(n, 1000).stored_len(), size);
        log.insert(with_padding(n, 1000)).unwrap();
    }
    let writes = log.take_writes();
    let cms = created(&writes);
    assert_eq!(cms.len(), 4, "{per_segment} records per create");
    assert_eq!(writes.len(), 4, "and nothing else");
    let sizes: Vec<usize> = cms.iter().map(|cm| entries(cm).len()).collect();
    assert_eq!(sizes, [per_segment, per_segment, per_segment, 1]);
    for cm in &cms {
        assert!(data_bytes(cm) <= budget, "{} bytes", data_bytes(cm));
    }
    let mut stored: Vec<String> = cms.iter().flat_map(|cm| entries(cm).into_keys()).collect();
    stored.sort();
    assert_eq!(stored.len(), count as usize, "each record once");
    stored.dedup();
    assert_eq!(stored.len(), count as usize);
    let write_names: Vec<&str> = writes.writes().iter().map(SegmentWrite::name).collect();
    assert_eq!(
        write_names,
        [
            "org-1-dfc76549-journal-1",
            "org-1-dfc76549-journal-2",
            "org-1-dfc76549-journal-3",
            "org-1-dfc76549-journal-4"
        ]
    );
    let segment_names: Vec<String> = log.segments().into_iter().map(|s| s.name).collect();
    assert_eq!(segment_names, write_names);
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);

    // A record larger than the budget gets a segment of its own, between its neighbours by id.
    let big = with_padding(61, 2 * budget);
    let big_size = big.stored_len();
    assert!(big_size > budget);
    log.insert(with_padding(60, 10)).unwrap();
    log.insert(big).unwrap();
    log.insert(with_padding(62, 10)).unwrap();
    let writes = log.take_writes();
    let cms = created(&writes);
    let keys: Vec<Vec<String>> = cms.iter().map(|cm| entries(cm).keys().cloned().collect()).collect();
    assert_eq!(keys, [ids([60]), ids([61]), ids([62])]);
    assert_eq!(data_bytes(cms[1]), big_size);
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);
}

#[test]
fn an_update_creates_a_segment_with_only_the_updated_record() {
    let mut log = new_log(config(100, 8 * 1024, 16));
    let mut server = FakeServer::default();
    for n in 0..5 {
        log.insert(record(n, DeliveryState::Pending)).unwrap();
    }
    assert_eq!(commit(&mut log, &mut server), 1);
    assert_in_sync(&log, &server);
    let first = log.segments()[0].clone();

    // Nothing changed: nothing to write.
    assert!(!log.has_changes());
    assert!(log.take_writes().is_empty());

    // Two updates of one record: one create, holding only its last version.
    let mut r = log.get(&id(2)).unwrap().clone();
    r.attempts = 1;
    r.last_error = Some("connection refused".into());
    assert!(log.update(r.clone()));
    r.attempts = 2;
    r.last_error = Some("timeout".into());
    assert!(log.update(r.clone()));
    assert!(log.has_changes());
    let writes = log.take_writes();
    assert_eq!(names(&writes), [("org-1-dfc76549-journal-2", true)]);
    let cm = created(&writes)[0];
    assert_eq!(
        Some(&entries(cm)),
        Some(&BTreeMap::from([(id(2), r.to_stored())])),
        "only the updated record"
    );
    assert_eq!(writes.record_ids().collect::<Vec<_>>(), [id(2).as_str()]);
    // The first segment keeps its superseded copy (and its bytes); the new one holds the live one.
    let segments = log.segments();
    assert_eq!(segments.len(), 2);
    assert_eq!(segments[0].ids, ids([0, 1, 3, 4]));
    assert_eq!(segments[0].bytes, first.bytes);
    assert_eq!(segments[1].ids, ids([2]));
    assert_eq!(segments[1].bytes, r.stored_len());
    server.apply(&writes, None).unwrap();
    assert_ne!(server.data("org-1-dfc76549-journal-1")[&id(2)], r.to_stored());
    assert_in_sync(&log, &server);
    assert!(!log.has_changes());
    assert!(log.take_writes().is_empty());

    // An update to the very same content still is a change to store.
    assert!(log.update(r.clone()));
    let writes = log.take_writes();
    assert_eq!(names(&writes), [("org-1-dfc76549-journal-3", true)]);
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);
    // Unknown ids are not updated.
    assert!(!log.update(record(99, DeliveryState::Pending)));
    assert!(!log.has_changes());
}

#[test]
fn superseded_segments_are_deleted_oldest_first() {
    let mut log = new_log(config(100, 8 * 1024, 16));
    let mut server = FakeServer::default();
    for batch in 0..3 {
        for n in batch * 3..batch * 3 + 3 {
            log.insert(record(n, DeliveryState::Pending)).unwrap();
        }
        commit(&mut log, &mut server);
    }
    assert_eq!(
        server.names(),
        [
            "org-1-dfc76549-journal-1",
            "org-1-dfc76549-journal-2",
            "org-1-dfc76549-journal-3"
        ]
    );
    assert_in_sync(&log, &server);

    // Every record of segments 1 and 2 is updated: the batch stores them in a new segment, then
    // deletes segment 1, then segment 2.
    for n in 0..6 {
        let mut r = log.get(&id(n)).unwrap().clone();
        r.attempts = 1;
        assert!(log.update(r));
    }
    let segments = log.segments();
    assert!(segments[0].ids.is_empty() && segments[1].ids.is_empty());
    let writes = log.take_writes();
    assert_eq!(
        names(&writes),
        [
            ("org-1-dfc76549-journal-4", true),
            ("org-1-dfc76549-journal-1", false),
            ("org-1-dfc76549-journal-2", false)
        ]
    );
    assert_eq!(entries(created(&writes)[0]).len(), 6);
    server.apply(&writes, None).unwrap();
    assert_eq!(server.names(), ["org-1-dfc76549-journal-3", "org-1-dfc76549-journal-4"]);
    assert_in_sync(&log, &server);
    assert!(!log.has_changes());

    // Records pruned without a new version (retention): their segment goes in the batch that
    // stores what pruned them.
    let mut log = new_log(config(2, 8 * 1024, 16));
    let mut server = FakeServer::default();
    log.insert(finished(0, DeliveryState::Succeeded, 10)).unwrap();
    log.insert(finished(1, DeliveryState::Succeeded, 11)).unwrap();
    commit(&mut log, &mut server);
    log.insert(finished(2, DeliveryState::Succeeded, 12)).unwrap();
    log.insert(finished(3, DeliveryState::Succeeded, 13)).unwrap();
    assert!(log.get(&id(0)).is_none() && log.get(&id(1)).is_none());
    let writes = log.take_writes();
    assert_eq!(
        names(&writes),
        [("org-1-dfc76549-journal-2", true), ("org-1-dfc76549-journal-1", false)]
    );
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);
}

#[test]
fn a_segment_without_live_records_waits_for_the_older_ones() {
    let cfg = config(1, 8 * 1024, 16);
    let mut log = new_log(cfg.clone());
    let mut server = FakeServer::default();
    // A is pending for long; B is delivered.
    let (a, b, c) = (id(0), id(1), id(2));
    log.insert(record(0, DeliveryState::Pending)).unwrap();
    log.insert(record(1, DeliveryState::Pending)).unwrap();
    commit(&mut log, &mut server);
    assert!(log.update(finished(1, DeliveryState::Succeeded, 100)));
    let writes = log.take_writes();
    assert_eq!(
        names(&writes),
        [("org-1-dfc76549-journal-2", true)],
        "A keeps segment 1"
    );
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);

    // C finishes later: retention prunes B, and segment 2 holds no live record any more. It stays
    // while segment 1 (holding B's pending copy) does: a recovery must find B delivered.
    log.insert(finished(2, DeliveryState::Succeeded, 200)).unwrap();
    assert!(log.get(&b).is_none());
    let writes = log.take_writes();
    assert_eq!(names(&writes), [("org-1-dfc76549-journal-3", true)]);
    server.apply(&writes, None).unwrap();
    assert_eq!(
        log.segments().into_iter().map(|s| (s.name, s.ids)).collect::<Vec<_>>(),
        [
            ("org-1-dfc76549-journal-1".to_string(), vec![a.clone()]),
            ("org-1-dfc76549-journal-2".to_string(), vec![]),
            ("org-1-dfc76549-journal-3".to_string(), vec![c.clone()]),
        ]
    );
    assert!(
        server.data("org-1-dfc76549-journal-1").contains_key(&b),
        "B's pending copy is still stored"
    );
    assert!(!log.has_changes(), "the oldest segment holds a live record");
    assert_in_sync(&log, &server);
    let back = recover(&server, cfg.clone());
    assert!(back.get(&b).is_none(), "B is not pending after a recovery");
    assert_eq!(back.pending().map(|r| r.id.as_str()).collect::<Vec<_>>(), [a.as_str()]);
    // What deleting segment 2 out of order would have done: B comes back as pending.
    let mut wrong = server.clone();
    wrong.objects.remove("org-1-dfc76549-journal-2");
    let resurrected = recover(&wrong, cfg.clone());
    assert_eq!(resurrected.get(&b).map(|r| r.state), Some(DeliveryState::Pending));

    // A is delivered: retention prunes C; segments 1, 2 and 3 go, oldest first.
    assert!(log.update(finished(0, DeliveryState::Succeeded, 300)));
    assert!(log.get(&c).is_none());
    let writes = log.take_writes();
    assert_eq!(
        names(&writes),
        [
            ("org-1-dfc76549-journal-4", true),
            ("org-1-dfc76549-journal-1", false),
            ("org-1-dfc76549-journal-2", false),
            ("org-1-dfc76549-journal-3", false),
        ]
    );
    server.apply(&writes, None).unwrap();
    assert_eq!(server.names(), ["org-1-dfc76549-journal-4"]);
    assert_in_sync(&log, &server);
    assert_eq!(log.pending_count(), 0);
}

#[test]
fn retention_prunes_the_oldest_finished_and_never_pending() {
    let mut log = new_log(config(3, 256 * 1024, 16));
    let mut server = FakeServer::default();
    for n in 0..5 {
        log.insert(record(n, DeliveryState::Pending)).unwrap();
    }
    // Finished records whose updated_at order differs from their id order.
    for (n, updated) in [(10, 50), (11, 10), (12, 40), (13, 20), (14, 30)] {
        log.insert(finished(n, DeliveryState::Succeeded, updated)).unwrap();
    }
    assert_eq!(log.finished_count(), 3);
    assert_eq!(log.pending_count(), 5);
    assert_eq!(log.len(), 8);
    for n in 10..15 {
        assert_eq!(log.get(&id(n)).is_some(), [10, 12, 14].contains(&n), "record {n}");
    }
    assert_eq!(log.pending().count(), 5);
    commit(&mut log, &mut server);
    assert_in_sync(&log, &server);

    // A pending record finishing with a recent time evicts the oldest finished one (14, at 30).
    let mut done = finished(0, DeliveryState::Failed, 60);
    done.attempts = 8;
    assert!(log.update(done));
    assert!(log.get(&id(14)).is_none());
    assert_eq!((log.finished_count(), log.pending_count()), (3, 4));
    commit(&mut log, &mut server);
    assert_in_sync(&log, &server);

    // Recovery applies retention: with a smaller max_finished, only the newest finished stay.
    let back = recover(&server, config(1, 256 * 1024, 16));
    let kept: Vec<&str> = back
        .records()
        .filter(|r| r.is_finished())
        .map(|r| r.id.as_str())
        .collect();
    assert_eq!(kept, ids([0]));
    assert_eq!(back.pending_count(), 4);
    let back = recover(&server, config(0, 256 * 1024, 16));
    assert_eq!((back.finished_count(), back.pending_count()), (0, 4));

    // Retrying a finished record makes it pending again: it is no longer subject to retention.
    let mut again = log.get(&id(12)).unwrap().clone();
    again.state = DeliveryState::Pending;
    assert!(log.update(again));
    assert_eq!((log.finished_count(), log.pending_count()), (2, 5));

    // Many pending records, none pruned.
    let mut busy = new_log(config(0, 256 * 1024, 16));
    for n in 0..200 {
        busy.insert(record(n, DeliveryState::Pending)).unwrap();
    }
    assert_eq!(busy.len(), 200);
    assert_eq!(busy.pending_count(), 200);
}

#[test]
fn a_record_pruned_before_its_last_version_was_stored_is_still_written() {
    let cfg = config(1, 8 * 1024, 16);
    let mut log = new_log(cfg.clone());
    let mut server = FakeServer::default();
    // X is delivered, then pruned by a later delivery before the batch: its delivered version
    // must still be stored, or segment 1's pending copy would win a recovery.
    let x = id(0);
    log.insert(record(0, DeliveryState::Pending)).unwrap();
    log.insert(record(1, DeliveryState::Pending)).unwrap();
    commit(&mut log, &mut server);
    let x_done = finished(0, DeliveryState::Succeeded, 50);
    assert!(log.update(x_done.clone()));
    let y = finished(2, DeliveryState::Succeeded, 60);
    log.insert(y.clone()).unwrap();
    assert!(log.get(&x).is_none());
    assert!(log.has_changes());
    let writes = log.take_writes();
    assert_eq!(names(&writes), [("org-1-dfc76549-journal-2", true)]);
    assert_eq!(
        Some(&entries(created(&writes)[0])),
        Some(&BTreeMap::from([
            (x.clone(), x_done.to_stored()),
            (y.id.clone(), y.to_stored())
        ]))
    );
    assert!(writes.record_ids().any(|i| i == x));
    let segments = log.segments();
    assert_eq!(segments[1].ids, [y.id.as_str()], "X is not live");
    assert_eq!(segments[1].bytes, x_done.stored_len() + y.stored_len());
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);
    assert!(recover(&server, cfg.clone()).get(&x).is_none());
    // Without that copy, X would come back as pending.
    let mut without = server.clone();
    let segment = without.objects.get_mut("org-1-dfc76549-journal-2").unwrap();
    let mut kept = entries(segment);
    kept.remove(&x);
    segment.binary_data = Some(BTreeMap::from([(
        crate::delivery_log::JOURNAL_KEY.to_string(),
        crate::delivery_log::pack_entries(&kept),
    )]));
    assert_eq!(
        recover(&without, cfg.clone()).get(&x).map(|r| r.state),
        Some(DeliveryState::Pending)
    );

    // A record inserted, finished and pruned within one batch is written as well.
    log.insert(record(3, DeliveryState::Pending)).unwrap();
    assert!(log.update(finished(3, DeliveryState::Failed, 5)));
    assert!(log.get(&id(3)).is_none());
    assert!(log.has_changes());
    let writes = log.take_writes();
    assert_eq!(names(&writes), [("org-1-dfc76549-journal-3", true)]);
    assert_eq!(
        Some(&entries(created(&writes)[0])),
        Some(&BTreeMap::from([(
            id(3),
            finished(3, DeliveryState::Failed, 5).to_stored()
        )]))
    );
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);
    assert_eq!(log.segments()[2].ids, Vec::<String>::new());

    // Once the older segments go, a segment holding only retired records is the oldest and holds
    // no live record: the next batch deletes it.
    assert!(log.update(finished(1, DeliveryState::Succeeded, 70)));
    let writes = log.take_writes();
    assert_eq!(
        names(&writes),
        [
            ("org-1-dfc76549-journal-4", true),
            ("org-1-dfc76549-journal-1", false),
            ("org-1-dfc76549-journal-2", false),
            ("org-1-dfc76549-journal-3", false)
        ]
    );
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);
    assert_eq!(log.len(), 1);
}

#[test]
fn a_segment_holding_only_retired_records_is_deleted_by_the_next_batch() {
    let mut log = new_log(config(0, 8 * 1024, 16));
    let mut server = FakeServer::default();
    log.insert(record(0, DeliveryState::Pending)).unwrap();
    commit(&mut log, &mut server);
    // Delivered and pruned at once (max_finished 0): the batch stores its last version and
    // deletes segment 1; the new segment holds no live record.
    assert!(log.update(finished(0, DeliveryState::Succeeded, 10)));
    assert!(log.is_empty());
    let writes = log.take_writes();
    assert_eq!(
        names(&writes),
        [("org-1-dfc76549-journal-2", true), ("org-1-dfc76549-journal-1", false)]
    );
    server.apply(&writes, None).unwrap();
    assert!(log.has_changes());
    assert_in_sync(&log, &server);
    let writes = log.take_writes();
    assert_eq!(names(&writes), [("org-1-dfc76549-journal-2", false)]);
    server.apply(&writes, None).unwrap();
    assert!(server.objects.is_empty());
    assert!(!log.has_changes());
    assert_in_sync(&log, &server);
}

#[test]
fn compaction_keeps_the_segment_count_bounded() {
    let max_segments = 8;
    let cfg = config(2, 2 * 1024, max_segments);
    let mut log = new_log(cfg.clone());
    let mut server = FakeServer::default();
    // Six records stay pending throughout, each stored by a batch of its own.
    for n in 0..6 {
        log.insert(record(n, DeliveryState::Pending)).unwrap();
        commit(&mut log, &mut server);
    }
    assert!(log.segment_count() <= max_segments);
    let initial: Vec<String> = log.segments().into_iter().map(|s| s.name).collect();
    // Many batches: each stores a new record and the previous one's delivery. Without
    // compaction, the oldest segment (pinned by a long-pending record) would keep every later one.
    let mut most = 0;
    for n in 100..160u32 {
        log.insert(record(n, DeliveryState::Pending)).unwrap();
        if n > 100 {
            assert!(log.update(finished(n - 1, DeliveryState::Succeeded, i64::from(n) * 10)));
        }
        most = most.max(commit_within(&mut log, &mut server, max_segments));
    }
    assert!(most <= max_segments, "at most {most} segments");
    assert!(
        log.segments().iter().all(|s| !initial.contains(&s.name)),
        "the long-pending records' segments were compacted away"
    );
    assert_eq!(log.pending().map(|r| r.id.clone()).collect::<Vec<_>>(), {
        let mut pending = ids(0..6);
        pending.push(id(159));
        pending
    });
    assert_eq!(log.finished_count(), 2);
    assert_eq!(server.objects.len(), log.segment_count());
}

/// Commits a batch and checks the segment count stays within `max_segments` plus what the batch
/// created, and that the server is in sync; returns the segment count.
fn commit_within(log: &mut DeliveryLog, server: &mut FakeServer, max_segments: usize) -> usize {
    let writes = log.take_writes();
    let creates = created(&writes).len();
    server.apply(&writes, None).unwrap();
    let count = log.segment_count();
    assert!(
        count <= max_segments + creates,
        "{count} segments after a batch creating {creates}"
    );
    assert_in_sync(log, server);
    count
}

#[test]
fn compaction_is_forced_above_max_segments() {
    // Three big pending records, each alone in a segment and taking more than half of it: too
    // costly to copy, they are compacted only once more than max_segments segments exist.
    let max_segments = 4;
    let budget = 4 * 1024;
    let mut log = new_log(config(100, budget, max_segments));
    let mut server = FakeServer::default();
    for n in 0..3 {
        log.insert(with_padding(n, budget / 2 - 100)).unwrap();
        commit(&mut log, &mut server);
    }
    assert!(log.segments().iter().all(|s| s.ids.len() == 1 && s.bytes > budget / 2));
    log.insert(record(10, DeliveryState::Pending)).unwrap();
    commit(&mut log, &mut server);
    assert_eq!(log.segment_count(), 4);
    let first = log.segments()[0].name.clone();

    // A small record updated by every batch: each batch supersedes the previous one's segment.
    let mut most = 0;
    for round in 1..40 {
        let mut r = log.get(&id(10)).unwrap().clone();
        r.attempts = round;
        assert!(log.update(r));
        most = most.max(commit_within(&mut log, &mut server, max_segments));
        if round == 1 {
            assert_eq!(log.segment_count(), 5, "no compaction at max_segments");
            assert_eq!(log.segments()[0].name, first);
        }
    }
    assert!(
        log.segments().iter().all(|s| s.name != first),
        "compacted above max_segments"
    );
    assert!(most <= max_segments + 1, "{most} segments");
    assert_eq!(log.pending().count(), 4);
}

#[test]
fn log_full_at_capacity_then_room_again_after_pruning() {
    let budget = 4 * 1024;
    let mut log = new_log(config(0, budget, 4));
    let mut server = FakeServer::default();
    // Capacity: max_segments / 2 × segment_bytes of live records, with GROWTH_RESERVE bytes per
    // pending one. A padding such that one more record would fit without its reserve.
    let capacity = 2 * budget;
    let padding = (400..700)
        .find(|&p| {
            let size = with_padding(10, p).stored_len();
            capacity % (size + GROWTH_RESERVE) >= size
        })
        .unwrap();
    let cost = with_padding(10, padding).stored_len() + GROWTH_RESERVE;
    let mut n = 10;
    let full = loop {
        match log.insert(with_padding(n, padding)) {
            Ok(()) => n += 1,
            Err(e) => break e,
        }
        if n % 3 == 0 {
            commit(&mut log, &mut server);
        }
    };
    assert_eq!(full, LogFull);
    let inserted = (n - 10) as usize;
    assert_eq!(inserted, capacity / cost);
    assert_eq!(log.len(), inserted);
    assert!(log.get(&id(n)).is_none());
    let writes = log.take_writes();
    assert!(
        !writes.record_ids().any(|i| i == id(n)),
        "a refused record is not written"
    );
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);

    // A finished record has no growth reserve: a pending record finishing (and, max_finished 0,
    // pruned) makes room for exactly one more.
    let mut done = log.get(&id(10)).unwrap().clone();
    done.state = DeliveryState::Succeeded;
    assert!(log.update(done));
    assert!(log.get(&id(10)).is_none());
    log.insert(with_padding(n, padding)).unwrap();
    assert_eq!(log.insert(with_padding(n + 1, padding)), Err(LogFull));
    commit(&mut log, &mut server);
    assert_in_sync(&log, &server);

    // Updates leave the capacity as it was (superseded copies do not count).
    for m in 11..=n {
        let mut r = log.get(&id(m)).unwrap().clone();
        r.attempts = 1;
        assert!(log.update(r));
    }
    commit(&mut log, &mut server);
    assert_eq!(log.insert(with_padding(n + 1, padding)), Err(LogFull));
    let mut done = log.get(&id(11)).unwrap().clone();
    done.state = DeliveryState::Failed;
    assert!(log.update(done));
    log.insert(with_padding(n + 1, padding)).unwrap();
    commit(&mut log, &mut server);
    assert_in_sync(&log, &server);

    // Records that could never be stored are refused too, whatever the room.
    let mut bad = record(5000, DeliveryState::Pending);
    bad.id = "msg/with/slashes".into();
    let mut empty = new_log(LogConfig::default());
    assert_eq!(empty.insert(bad), Err(LogFull));
    let huge = with_padding(5001, MAX_RECORD_BYTES);
    assert!(huge.stored_len() > MAX_RECORD_BYTES);
    assert_eq!(empty.insert(huge), Err(LogFull));
    assert!(empty.is_empty() && !empty.has_changes());
    let large = with_padding(5002, MAX_RECORD_BYTES - 1000);
    assert!(large.stored_len() <= MAX_RECORD_BYTES);
    empty.insert(large).unwrap();
}

#[test]
fn restore_after_a_failed_create_writes_the_records_again_in_a_new_segment() {
    let mut log = new_log(config(10, 8 * 1024, 16));
    let mut server = FakeServer::default();

    // The only segment's create fails: it may exist, so it leaves the image and the next batch
    // deletes it, after storing its records again in a new segment.
    log.insert(record(0, DeliveryState::Pending)).unwrap();
    log.insert(record(1, DeliveryState::Pending)).unwrap();
    let writes = log.take_writes();
    assert_eq!(names(&writes), [("org-1-dfc76549-journal-1", true)]);
    assert!(server.apply(&writes, Some(0)).is_err());
    log.restore(writes);
    assert!(log.has_changes());
    assert!(log.segments().is_empty());
    log.insert(record(2, DeliveryState::Pending)).unwrap();
    let writes = log.take_writes();
    assert_eq!(
        names(&writes),
        [("org-1-dfc76549-journal-2", true), ("org-1-dfc76549-journal-1", false)]
    );
    assert_eq!(
        entries(created(&writes)[0]).keys().cloned().collect::<Vec<_>>(),
        ids(0..3)
    );
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);

    // A failed create behind an older segment with live records: deleted all the same, out of
    // turn, once the next batch stored what it held.
    let mut r = log.get(&id(0)).unwrap().clone();
    r.attempts = 1;
    assert!(log.update(r.clone()));
    let writes = log.take_writes();
    assert_eq!(names(&writes), [("org-1-dfc76549-journal-3", true)]);
    assert!(server.apply(&writes, Some(0)).is_err());
    log.restore(writes);
    let writes = log.take_writes();
    assert_eq!(
        names(&writes),
        [("org-1-dfc76549-journal-4", true), ("org-1-dfc76549-journal-3", false)]
    );
    assert_eq!(
        Some(&entries(created(&writes)[0])),
        Some(&BTreeMap::from([(id(0), r.to_stored())]))
    );
    server.apply(&writes, None).unwrap();
    assert!(!log.has_changes());
    assert_in_sync(&log, &server);
    let segments: Vec<(String, Vec<String>)> = log.segments().into_iter().map(|s| (s.name, s.ids)).collect();
    assert_eq!(
        segments,
        [
            ("org-1-dfc76549-journal-2".to_string(), ids([1, 2])),
            ("org-1-dfc76549-journal-4".to_string(), ids([0])),
        ]
    );

    // A create applied whose answer was lost: the segment exists, and goes the same way.
    let mut r1 = log.get(&id(1)).unwrap().clone();
    r1.attempts = 1;
    assert!(log.update(r1));
    let writes = log.take_writes();
    assert_eq!(names(&writes), [("org-1-dfc76549-journal-5", true)]);
    server.apply(&writes, None).unwrap();
    log.restore(writes);
    assert!(log.has_changes());
    assert_records_recover(&log, &server);
    let writes = log.take_writes();
    assert_eq!(
        names(&writes),
        [("org-1-dfc76549-journal-6", true), ("org-1-dfc76549-journal-5", false)]
    );
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);

    // Segments leave from the front as before once they hold no live record.
    let mut r2 = log.get(&id(2)).unwrap().clone();
    r2.attempts = 1;
    assert!(log.update(r2));
    let writes = log.take_writes();
    assert_eq!(
        names(&writes),
        [("org-1-dfc76549-journal-7", true), ("org-1-dfc76549-journal-2", false)]
    );
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);
    assert_eq!(
        log.segments().into_iter().map(|s| s.name).collect::<Vec<_>>(),
        [
            "org-1-dfc76549-journal-4",
            "org-1-dfc76549-journal-6",
            "org-1-dfc76549-journal-7"
        ]
    );
}

/// Whatever a failed batch held and the image no longer has (a delivery taken back because its
/// event was answered 503) is not read back from the failed batch's segments, even those whose
/// create landed.
#[test]
fn a_delivery_taken_back_after_a_failed_batch_is_never_read_back() {
    let mut log = new_log(config(10, 8 * 1024, 16));
    let mut server = FakeServer::default();
    log.insert(record(0, DeliveryState::Pending)).unwrap();
    commit(&mut log, &mut server);
    // Two segments in one batch (a small segment budget is not needed: two batches restored
    // together behave the same); the first lands, the second fails.
    log.insert(record(1, DeliveryState::Pending)).unwrap();
    let first = log.take_writes();
    log.insert(record(2, DeliveryState::Pending)).unwrap();
    let second = log.take_writes();
    server.apply(&first, None).unwrap();
    assert!(server.apply(&second, Some(0)).is_err());
    log.restore(second);
    log.restore(first);
    // Record 1's event was answered 503: taken out; record 2 stays and is written again.
    assert!(log.discard_unstored(&id(1)));
    let writes = log.take_writes();
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);
    assert!(log.get(&id(1)).is_none());
    let read_back = recover(&server, log.config().clone());
    assert!(read_back.get(&id(1)).is_none(), "a taken-back delivery came back");
    assert!(read_back.get(&id(2)).is_some());
}

#[test]
fn restore_writes_retired_records_again() {
    let cfg = config(0, 8 * 1024, 16);
    let mut log = new_log(cfg.clone());
    let mut server = FakeServer::default();
    log.insert(record(0, DeliveryState::Pending)).unwrap();
    log.insert(record(1, DeliveryState::Pending)).unwrap();
    commit(&mut log, &mut server);
    // Record 1 is delivered and pruned at once (max_finished 0): the batch stores its last version.
    let done = finished(1, DeliveryState::Succeeded, 100);
    assert!(log.update(done.clone()));
    assert!(log.get(&id(1)).is_none());
    let writes = log.take_writes();
    assert_eq!(names(&writes), [("org-1-dfc76549-journal-2", true)]);
    assert!(server.apply(&writes, Some(0)).is_err());
    log.restore(writes);
    assert!(log.has_changes());
    // The next batch stores it again, in a new segment, and deletes the failed one.
    let writes = log.take_writes();
    assert_eq!(
        names(&writes),
        [("org-1-dfc76549-journal-3", true), ("org-1-dfc76549-journal-2", false)]
    );
    assert_eq!(
        Some(&entries(created(&writes)[0])),
        Some(&BTreeMap::from([(id(1), done.to_stored())]))
    );
    assert!(writes.record_ids().any(|i| i == id(1)));
    server.apply(&writes, None).unwrap();
    assert_records_recover(&log, &server);
    assert!(recover(&server, cfg).get(&id(1)).is_none(), "not pending again");
    // Segment 2 went although segment 1, which holds record 0, is older; segment 3 (only the
    // retired version) waits behind segment 1.
    assert_eq!(
        log.segments().into_iter().map(|s| (s.name, s.ids)).collect::<Vec<_>>(),
        [
            ("org-1-dfc76549-journal-1".to_string(), ids([0])),
            ("org-1-dfc76549-journal-3".to_string(), vec![]),
        ]
    );
    assert!(!log.has_changes());
}

#[test]
fn restore_after_a_failed_delete_deletes_again() {
    let mut log = new_log(config(10, 8 * 1024, 16));
    let mut server = FakeServer::default();
    log.insert(record(0, DeliveryState::Pending)).unwrap();
    commit(&mut log, &mut server);
    let mut r = log.get(&id(0)).unwrap().clone();
    r.attempts = 1;
    assert!(log.update(r.clone()));
    let writes = log.take_writes();
    assert_eq!(
        names(&writes),
        [("org-1-dfc76549-journal-2", true), ("org-1-dfc76549-journal-1", false)]
    );
    // The create is done, the delete fails.
    assert!(server.apply(&writes, Some(1)).is_err());
    log.restore(writes);
    assert!(log.has_changes());
    assert_records_recover(&log, &server);
    // Meanwhile, a new record.
    log.insert(record(1, DeliveryState::Pending)).unwrap();
    let writes = log.take_writes();
    assert_eq!(
        names(&writes),
        [
            ("org-1-dfc76549-journal-3", true),
            ("org-1-dfc76549-journal-1", false),
            ("org-1-dfc76549-journal-2", false)
        ]
    );
    assert_eq!(
        Some(&entries(created(&writes)[0])),
        Some(&BTreeMap::from([
            (id(0), r.to_stored()),
            (id(1), record(1, DeliveryState::Pending).to_stored())
        ]))
    );
    server.apply(&writes, None).unwrap();
    assert_eq!(server.names(), ["org-1-dfc76549-journal-3"]);
    assert_in_sync(&log, &server);

    // A failed batch that both creates and deletes, failing at its delete again and again.
    assert!(log.update(finished(1, DeliveryState::Succeeded, 100)));
    let mut r = log.get(&id(0)).unwrap().clone();
    r.attempts = 2;
    assert!(log.update(r));
    for round in 0..3 {
        let writes = log.take_writes();
        let deletes = writes
            .writes()
            .iter()
            .filter(|w| matches!(w, SegmentWrite::Delete { .. }))
            .count();
        assert!(deletes >= 1, "round {round}");
        let first_delete = writes
            .writes()
            .iter()
            .position(|w| matches!(w, SegmentWrite::Delete { .. }))
            .unwrap();
        assert!(server.apply(&writes, Some(first_delete)).is_err());
        log.restore(writes);
        assert_records_recover(&log, &server);
    }
    commit(&mut log, &mut server);
    assert_in_sync(&log, &server);
    assert_eq!(server.objects.len(), 1);
}

#[test]
fn recovery_skips_corrupt_keys_foreign_segments_and_takes_the_newest_copy() {
    let cfg = config(100, 4 * 1024, 16);
    let r0 = record(0, DeliveryState::Pending);
    let mut r0_newest = r0.clone();
    r0_newest.attempts = 5;
    r0_newest.updated_at = ts(-100); // older than in segment 9, but in a newer segment
    let mut r0_older = r0.clone();
    r0_older.attempts = 3;
    r0_older.updated_at = ts(500);
    let stored = |r: &DeliveryRecord| (r.id.clone(), r.to_stored());
    let nine = segment_cm(
        9,
        vec![
            stored(&r0_older),
            stored(&record(1, DeliveryState::Pending)),
            ("msg_corrupt".into(), "{not json".into()),
            ("evt_corrupt".into(), "{not json".into()),
            ("not/a/key".into(), record(77, DeliveryState::Pending).to_stored()),
        ],
    );
    // Sorted by name, segment 10 comes before segment 9: the order is by sequence number.
    let ten = segment_cm(10, vec![stored(&r0_newest), stored(&record(2, DeliveryState::Pending))]);
    let only_corrupt = segment_cm(11, vec![("msg_bad".into(), "nope".into())]);
    // A segment holding nothing readable: its sequence number is never reused all the same.
    let unreadable = segment_cm(40, vec![("msg_x".into(), LEGACY_RECORD.into())]);
    let unreadable_bytes = data_bytes(&unreadable);
    let mut stranger = segment_cm(50, vec![stored(&record(99, DeliveryState::Pending))]);
    stranger.metadata.name = Some("ep1-something-else".into());
    let cms = vec![ten.clone(), only_corrupt.clone(), unreadable, nine.clone(), stranger];

    let mut back = DeliveryLog::from_configmaps("ns1", "org_1", cfg, cms);
    assert_eq!(
        back.records().map(|r| r.id.clone()).collect::<Vec<_>>(),
        ids(0..3),
        "no corrupt, mismatched, unreadable or stray record"
    );
    assert_eq!(back.get(&r0.id), Some(&r0_newest));
    assert_eq!(back.pending_count(), 3);
    assert_eq!(
        back.segments(),
        [
            SegmentSummary {
                name: "org-1-dfc76549-journal-9".into(),
                ids: ids([1]),
                bytes: data_bytes(&nine),
            },
            SegmentSummary {
                name: "org-1-dfc76549-journal-10".into(),
                ids: ids([0, 2]),
                bytes: data_bytes(&ten),
            },
            SegmentSummary {
                name: "org-1-dfc76549-journal-11".into(),
                ids: vec![],
                bytes: data_bytes(&only_corrupt),
            },
            SegmentSummary {
                name: "org-1-dfc76549-journal-40".into(),
                ids: vec![],
                bytes: unreadable_bytes,
            },
        ]
    );
    assert!(!back.has_changes(), "the oldest segment holds a live record");

    // The recovered log carries on: a fresh sequence number, past the last segment's.
    back.insert(record(3, DeliveryState::Pending)).unwrap();
    let mut r1 = back.get(&id(1)).unwrap().clone();
    r1.attempts = 1;
    assert!(back.update(r1));
    let writes = back.take_writes();
    // Segment 9 holds no live record any more: it goes; segment 10 stays (and so does 11).
    assert_eq!(
        names(&writes),
        [("org-1-dfc76549-journal-41", true), ("org-1-dfc76549-journal-9", false)]
    );
    assert_eq!(
        back.segments().into_iter().map(|s| s.name).collect::<Vec<_>>(),
        [
            "org-1-dfc76549-journal-10",
            "org-1-dfc76549-journal-11",
            "org-1-dfc76549-journal-40",
            "org-1-dfc76549-journal-41"
        ]
    );
}

#[test]
fn recovery_rebuilds_an_identical_image() {
    let cfg = config(20, 8 * 1024, 10);
    let mut log = new_log(cfg.clone());
    let mut server = FakeServer::default();
    let mut updated = 1000;
    for round in 0..10u32 {
        for n in round * 10..round * 10 + 10 {
            log.insert(with_padding(n, 300)).unwrap();
        }
        // Finish the previous round's records, one in three with a long error (capped when stored).
        for n in round.saturating_sub(1) * 10..round * 10 {
            updated += 1;
            let state = if n % 3 == 0 {
                DeliveryState::Failed
            } else {
                DeliveryState::Succeeded
            };
            let mut r = with_padding(n, 300);
            r.state = state;
            r.attempts = 1;
            r.updated_at = ts(updated);
            r.last_error = (state == DeliveryState::Failed).then(|| "HTTP 503 ".repeat(100));
            assert!(log.update(r));
        }
        commit(&mut log, &mut server);
        assert_in_sync(&log, &server);
    }
    assert_eq!((log.pending_count(), log.finished_count()), (10, 20));

    let mut back = recover(&server, cfg.clone());
    assert_eq!(back.segments(), log.segments());
    assert_eq!(back.records().collect::<Vec<_>>(), log.records().collect::<Vec<_>>());
    assert_eq!(back.newest_first("ep1", 7), log.newest_first("ep1", 7));
    assert_eq!(back.approx_bytes(), log.approx_bytes());
    assert!(!back.has_changes());
    assert!(back.take_writes().is_empty());

    // The recovered log carries on where the other left off.
    let last = log.segments().last().unwrap().name.clone();
    let last_seq = journal_seq(&last).unwrap();
    back.insert(with_padding(500, 300)).unwrap();
    let writes = back.take_writes();
    assert_eq!(
        writes.writes()[0].name(),
        format!("org-1-dfc76549-journal-{}", last_seq + 1)
    );
    server.apply(&writes, None).unwrap();
    assert_in_sync(&back, &server);
}

#[test]
fn updates_stay_under_the_hard_segment_limit() {
    let mut log = new_log(config(10_000, MAX_SEGMENT_BYTES * 4, 16));
    let mut server = FakeServer::default();
    // Two records near MAX_RECORD_BYTES: segment_bytes is clamped to MAX_SEGMENT_BYTES, so each
    // gets a create of its own.
    let big = |n| with_padding(n, MAX_RECORD_BYTES - 2000);
    for n in 0..2 {
        assert!(big(n).stored_len() <= MAX_RECORD_BYTES);
        log.insert(big(n)).unwrap();
    }
    let writes = log.take_writes();
    assert_eq!(created(&writes).len(), 2);
    server.apply(&writes, None).unwrap();

    // Both fail with a long error of 4-byte characters: capped at MAX_ERROR_CHARS characters,
    // they end up above MAX_RECORD_BYTES but far below HARD_SEGMENT_BYTES.
    for n in 0..2 {
        let mut r = log.get(&id(n)).unwrap().clone();
        r.attempts = 1;
        r.last_error = Some("🦫".repeat(2000));
        assert!(log.update(r));
        let stored = log.get(&id(n)).unwrap();
        assert_eq!(
            stored.last_error.as_deref().map(|e| e.chars().count()),
            Some(MAX_ERROR_CHARS)
        );
        assert!(stored.stored_len() > MAX_RECORD_BYTES);
    }
    let writes = log.take_writes();
    let cms = created(&writes);
    assert_eq!(cms.len(), 2);
    for cm in &cms {
        assert_eq!(entries(cm).len(), 1);
        assert!(data_bytes(cm) <= HARD_SEGMENT_BYTES, "{} bytes", data_bytes(cm));
    }
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);

    // Should an update take a record past HARD_SEGMENT_BYTES, its error is shortened until it fits.
    let mut r = log.get(&id(0)).unwrap().clone();
    r.last_error = None;
    r.event_type = String::new();
    let overhead = r.stored_len();
    r.event_type = "p".repeat(HARD_SEGMENT_BYTES - 1000 - overhead);
    assert_eq!(r.stored_len(), HARD_SEGMENT_BYTES - 1000);
    r.last_error = Some("🦫".repeat(2000));
    assert!(log.update(r));
    let stored = log.get(&id(0)).unwrap();
    assert!(
        stored.stored_len() <= HARD_SEGMENT_BYTES,
        "{} bytes",
        stored.stored_len()
    );
    let chars = stored.last_error.as_deref().map_or(0, |e| e.chars().count());
    assert!(chars > 0 && chars < MAX_ERROR_CHARS, "{chars} characters");
    let writes = log.take_writes();
    let cms = created(&writes);
    assert_eq!(cms.len(), 1);
    assert!(data_bytes(cms[0]) <= HARD_SEGMENT_BYTES);
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);
}

#[test]
fn newest_first_orders_by_creation_then_id() {
    let mut log = new_log(LogConfig::default());
    for n in [3, 1, 2] {
        log.insert(record(n, DeliveryState::Pending)).unwrap();
    }
    let mut same_time = record(4, DeliveryState::Pending);
    same_time.created_at = ts(3);
    log.insert(same_time).unwrap();
    let newest: Vec<&str> = log.newest_first("ep1", 3).into_iter().map(|r| r.id.as_str()).collect();
    assert_eq!(newest, [id(4), id(3), id(2)]);
    assert_eq!(log.newest_first("ep1", 100).len(), 4);
    assert!(log.newest_first("ep1", 0).is_empty());
}

#[test]
fn a_record_pruned_while_its_batch_is_in_flight_is_not_resurrected_by_a_failure() {
    let cfg = config(1, 8 * 1024, 16);
    let mut log = new_log(cfg.clone());
    let mut server = FakeServer::default();
    // W stays pending (and keeps segment 1 alive), X and Y are pending too.
    for n in 0..3 {
        log.insert(record(n, DeliveryState::Pending)).unwrap();
    }
    commit(&mut log, &mut server);
    let x = record(1, DeliveryState::Pending).id;
    // X is delivered; the batch storing that is taken...
    assert!(log.update(finished(1, DeliveryState::Succeeded, 100)));
    let writes = log.take_writes();
    assert_eq!(writes.record_ids().collect::<Vec<_>>(), [x.as_str()]);
    // While that write is in flight (the worker goes on), Y is delivered: retention prunes X.
    assert!(log.update(finished(2, DeliveryState::Succeeded, 200)));
    assert!(log.get(&x).is_none());
    // The write fails and is given back; the next batch succeeds.
    assert!(server.apply(&writes, Some(0)).is_err());
    log.restore(writes);
    commit(&mut log, &mut server);
    // X was delivered: it must not come back as pending.
    let back = recover(&server, cfg);
    assert_eq!(back.get(&x).map(|r| r.state), None);
    assert_records_recover(&log, &server);
}

/// A pending delivery of event `event` to `endpoint`.
fn delivery(n: u32, endpoint: &str, event: &str) -> DeliveryRecord {
    let mut r = record(n, DeliveryState::Pending);
    r.endpoint_id = endpoint.into();
    r.event_id = event.into();
    r
}

fn payload(padding: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"type":"database.created","timestamp":"2026-12-03T00:00:00Z","data":{{"pad":"{}"}}}}"#,
        "p".repeat(padding)
    ))
}

fn finish(log: &mut DeliveryLog, n: u32, updated: i64) {
    let mut done = log.get(&id(n)).unwrap().clone();
    done.state = DeliveryState::Succeeded;
    done.attempts = 1;
    done.updated_at = ts(updated);
    done.delivered_at = Some(ts(updated));
    done.next_attempt_at = None;
    assert!(log.update(done));
}

#[test]
fn an_event_is_stored_once_however_many_endpoints_it_goes_to() {
    let cfg = config(10, 256 * 1024, 16);
    let mut log = new_log(cfg.clone());
    let mut server = FakeServer::default();
    log.insert_event("evt_1", payload(2000)).unwrap();
    for (n, endpoint) in ["ep1", "ep2", "ep3"].into_iter().enumerate() {
        log.insert(delivery(n as u32, endpoint, "evt_1")).unwrap();
    }
    let writes = log.take_writes();
    let cms = created(&writes);
    assert_eq!(cms.len(), 1, "one create for the event and its three deliveries");
    let data = entries(cms[0]);
    assert_eq!(data.len(), 4);
    assert_eq!(data["evt_1"].as_bytes(), &payload(2000)[..]);
    assert_eq!(
        data.values().filter(|v| v.contains("ppp")).count(),
        1,
        "the payload once"
    );
    for id in ids(0..3) {
        assert!(data[&id].len() < 150, "a small record: {}", data[&id]);
    }
    let mut stored: Vec<&str> = writes.record_ids().collect();
    stored.sort();
    assert_eq!(stored.len(), 4);
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);

    // A state change writes the small record only.
    finish(&mut log, 0, 50);
    let writes = log.take_writes();
    let keys: Vec<String> = entries(created(&writes)[0]).into_keys().collect();
    assert_eq!(keys, [id(0)]);
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);
    let back = recover(&server, cfg);
    assert_eq!(back.payload("evt_1"), Some(&payload(2000)));
    assert_eq!(back.payload_json("evt_1").unwrap()["type"], "database.created");
    assert_eq!(back.event_count(), 1);
    assert_eq!(back.pending_count_of("ep2"), 1);
    assert_eq!(back.newest_first("ep1", 10).len(), 1);
    assert_eq!(back.pending_count_of("ep1"), 0);
}

#[test]
fn an_event_goes_with_the_last_delivery_carrying_it() {
    let cfg = config(1, 256 * 1024, 16);
    let mut log = new_log(cfg.clone());
    let mut server = FakeServer::default();
    log.insert_event("evt_a", payload(100)).unwrap();
    log.insert(delivery(0, "ep1", "evt_a")).unwrap();
    log.insert(delivery(1, "ep2", "evt_a")).unwrap();
    commit(&mut log, &mut server);
    // Endpoint 1's delivery of A is pruned by a later one: A stays, endpoint 2's carries it.
    finish(&mut log, 0, 10);
    log.insert_event("evt_b", payload(100)).unwrap();
    log.insert(delivery(2, "ep1", "evt_b")).unwrap();
    finish(&mut log, 2, 20);
    assert!(log.get(&id(0)).is_none(), "retention pruned it");
    assert!(log.payload("evt_a").is_some());
    commit(&mut log, &mut server);
    assert_in_sync(&log, &server);

    // Endpoint 2's delivery of A is pruned too: A goes, and its stored copy with its segment.
    finish(&mut log, 1, 30);
    log.insert(delivery(3, "ep2", "evt_b")).unwrap();
    finish(&mut log, 3, 40);
    assert!(log.get(&id(1)).is_none());
    assert!(log.payload("evt_a").is_none(), "no delivery carries A any more");
    assert_eq!(log.event_count(), 1);
    commit(&mut log, &mut server);
    assert_in_sync(&log, &server);
    assert!(
        server.objects.values().all(|cm| !entries(cm).contains_key("evt_a")),
        "the segment holding A was deleted"
    );

    // An event inserted and left without deliveries (a request refused half way) can be dropped
    // before it is written; one a delivery carries cannot.
    log.insert_event("evt_c", payload(10)).unwrap();
    assert!(log.discard_unused_event("evt_c"));
    assert!(!log.discard_unused_event("evt_b"));
    log.insert_event("evt_d", payload(10)).unwrap();
    log.insert(delivery(4, "ep3", "evt_d")).unwrap();
    assert!(log.discard_unstored(&id(4)));
    assert!(log.payload("evt_d").is_none(), "dropped with its only delivery");
    assert!(!log.discard_unstored(&id(3)), "a stored delivery stays");
    assert!(!log.has_changes());
}

#[test]
fn removing_an_endpoint_drops_its_deliveries_and_their_events() {
    let cfg = config(10, 256 * 1024, 16);
    let mut log = new_log(cfg.clone());
    let mut server = FakeServer::default();
    log.insert_event("evt_a", payload(100)).unwrap();
    log.insert(delivery(0, "ep1", "evt_a")).unwrap();
    log.insert(delivery(1, "ep2", "evt_a")).unwrap();
    log.insert_event("evt_b", payload(100)).unwrap();
    log.insert(delivery(2, "ep2", "evt_b")).unwrap();
    commit(&mut log, &mut server);
    assert_eq!(log.remove_endpoint("ep2"), 2);
    assert_eq!(log.remove_endpoint("ep2"), 0);
    assert_eq!(log.len(), 1);
    assert!(log.payload("evt_a").is_some() && log.payload("evt_b").is_none());
    assert_eq!(log.endpoints().collect::<Vec<_>>(), ["ep1"]);
    assert_eq!(log.pending_count(), 1);
    // Endpoint 1's delivery is done: its new copy is written. The first segment stays (it holds
    // event A, which that delivery carries) with what endpoint 2 left there: a recovery reads
    // those back, and the dispatcher removes them again (their endpoint is gone).
    finish(&mut log, 0, 10);
    commit(&mut log, &mut server);
    let mut back = recover(&server, cfg);
    assert_eq!(back.remove_endpoint("ep2"), 2);
    assert_eq!(back.records().collect::<Vec<_>>(), log.records().collect::<Vec<_>>());
    assert_eq!(back.event_count(), log.event_count());
    assert_eq!(back.segments(), log.segments());
}

/// A first-format segment of endpoint `ep-01kbkz7x`, as version 0.1 wrote it.
fn legacy_cm(seq: u64, records: &[serde_json::Value]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(legacy_segment_name("ep-01kbkz7x", seq)),
            namespace: Some("ns1".into()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), "capy-webhooks".to_string()),
                (COMPONENT_LABEL.to_string(), "delivery-log".to_string()),
                (ORGANIZATION_LABEL.to_string(), "org_demo".to_string()),
            ])),
            ..Default::default()
        },
        data: Some(
            records
                .iter()
                .map(|r| (r["id"].as_str().unwrap().to_string(), r.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

#[test]
fn a_log_of_the_first_format_is_read_written_again_and_then_deleted() {
    let x_pending: serde_json::Value = serde_json::from_str(LEGACY_RECORD).unwrap();
    let mut x_done = x_pending.clone();
    x_done["state"] = "succeeded".into();
    x_done["attempts"] = 2.into();
    x_done["next_attempt_at"] = serde_json::Value::Null;
    x_done["delivered_at"] = "2026-11-30T10:06:00Z".into();
    x_done["response_status"] = 200.into();
    let mut y = x_pending.clone();
    y["id"] = "msg_01kbkz9a0000000000000000yy".into();
    y["event_id"] = "evt_01kbkz9a0000000000000000yy".into();
    y["payload"]["data"]["db"] = "other".into();
    let mut foreign = y.clone();
    foreign["id"] = "msg_01kbkz9a0000000000000000zz".into();
    foreign["organization_id"] = "org_other".into();
    let one = legacy_cm(1, &[x_pending.clone(), y.clone(), foreign]);
    let two = legacy_cm(2, &[x_done.clone()]);
    let mut server = FakeServer::default();
    for cm in [&one, &two] {
        server.objects.insert(cm.metadata.name.clone().unwrap(), cm.clone());
    }
    let cfg = config(10, 256 * 1024, 16);
    let read = |server: &FakeServer| DeliveryLog::from_configmaps("ns1", "org_demo", cfg.clone(), server.configmaps());

    let mut log = read(&server);
    let x_id = x_pending["id"].as_str().unwrap();
    let y_id = y["id"].as_str().unwrap();
    assert_eq!(log.len(), 2, "the other organization's record is not read");
    let x = log.get(x_id).unwrap().clone();
    assert_eq!(
        (x.state, x.attempts),
        (DeliveryState::Succeeded, 2),
        "the newer segment's copy wins"
    );
    assert_eq!(x.organization_id, "org_demo");
    assert_eq!(log.pending().map(|r| r.id.as_str()).collect::<Vec<_>>(), [y_id]);
    assert_eq!(log.payload_json(&x.event_id).unwrap()["data"]["db"], "main");
    assert_eq!(
        log.payload_json(y["event_id"].as_str().unwrap()).unwrap()["data"]["db"],
        "other"
    );
    assert!(log.has_changes());

    // The first batch writes everything in the new format, then deletes the old segments.
    let writes = log.take_writes();
    let old_one = one.metadata.name.clone().unwrap();
    let old_two = two.metadata.name.clone().unwrap();
    let journal = journal_segment_name("org_demo", 1);
    assert_eq!(
        names(&writes),
        [
            (journal.as_str(), true),
            (old_one.as_str(), false),
            (old_two.as_str(), false)
        ]
    );
    let data = entries(created(&writes)[0]);
    assert_eq!(data.len(), 4, "two events and two deliveries: {:?}", data.keys());
    assert!(data[x_id].len() < 200 && !data[x_id].contains("payload"));

    // Should the deletes fail (or the process die before them), the new copies win a recovery
    // and the old segments are deleted by the next batch, with nothing written again.
    let first_delete = 1;
    assert!(server.apply(&writes, Some(first_delete)).is_err());
    let mut again = read(&server);
    assert_eq!(again.records().collect::<Vec<_>>(), log.records().collect::<Vec<_>>());
    let writes = again.take_writes();
    assert_eq!(names(&writes), [(old_one.as_str(), false), (old_two.as_str(), false)]);
    server.apply(&writes, None).unwrap();
    assert_eq!(server.names(), [journal.as_str()]);
    let back = read(&server);
    assert!(!back.has_changes());
    assert_eq!(back.records().collect::<Vec<_>>(), log.records().collect::<Vec<_>>());
    assert_eq!(back.payload_json(&x.event_id).unwrap()["data"]["db"], "main");

    // A failed migration batch is written again, and the old segments still go only after.
    let mut log = DeliveryLog::from_configmaps("ns1", "org_demo", cfg.clone(), [one.clone(), two.clone()]);
    let writes = log.take_writes();
    log.restore(writes);
    let writes = log.take_writes();
    let order: Vec<bool> = names(&writes).into_iter().map(|(_, create)| create).collect();
    assert_eq!(order, [true, false, false, false], "creates, then every delete");
}

#[test]
fn payloads_count_against_the_capacity_of_every_endpoint_they_go_to() {
    // Capacity: max_segments / 2 × segment_bytes = 8 KiB per endpoint.
    let mut log = new_log(config(100, 4 * 1024, 4));
    let big = payload(1500);
    let cost = delivery(0, "ep1", "evt_x").stored_len() + GROWTH_RESERVE + "evt_0".len() + big.len();
    let fits = 8 * 1024 / cost;
    assert!(fits >= 2);
    for n in 0..fits as u32 {
        let event = format!("evt_{n}");
        log.insert_event(&event, big.clone()).unwrap();
        log.insert(delivery(n, "ep1", &event)).unwrap();
    }
    // One more event of that size does not fit endpoint 1: as when each record held its payload.
    log.insert_event("evt_99", big.clone()).unwrap();
    assert_eq!(log.insert(delivery(99, "ep1", "evt_99")), Err(LogFull));
    // Another endpoint has room; small events still fit endpoint 1.
    log.insert(delivery(98, "ep2", "evt_99")).unwrap();
    log.insert_event("evt_small", payload(10)).unwrap();
    log.insert(delivery(97, "ep1", "evt_small")).unwrap();
    // Delivered and pruned (max_finished 0 on a new log), a delivery gives its room back.
    let mut small = new_log(config(0, 4 * 1024, 4));
    for n in 0..fits as u32 {
        let event = format!("evt_{n}");
        small.insert_event(&event, big.clone()).unwrap();
        small.insert(delivery(n, "ep1", &event)).unwrap();
    }
    small.insert_event("evt_99", big.clone()).unwrap();
    assert_eq!(small.insert(delivery(99, "ep1", "evt_99")), Err(LogFull));
    finish(&mut small, 0, 10);
    assert!(small.get(&id(0)).is_none());
    small.insert(delivery(99, "ep1", "evt_99")).unwrap();

    // Finished deliveries are history, bounded by retention: their payloads never block a new
    // delivery (max_finished 100 here; only their small records count).
    let mut busy = new_log(config(100, 4 * 1024, 4));
    let mut server = FakeServer::default();
    let per_round = fits as u32 - 1;
    for round in 0..3u32 {
        for n in round * 10..round * 10 + per_round {
            let event = format!("evt_{n}");
            busy.insert_event(&event, big.clone()).unwrap();
            busy.insert(delivery(n, "ep1", &event)).unwrap();
        }
        commit(&mut busy, &mut server);
        for n in round * 10..round * 10 + per_round {
            finish(&mut busy, n, 10 + i64::from(n));
        }
        commit(&mut busy, &mut server);
    }
    assert_eq!(busy.finished_count(), 3 * per_round as usize);
    busy.insert_event("evt_99", big.clone()).unwrap();
    busy.insert(delivery(99, "ep1", "evt_99")).unwrap();
    assert!(busy.payload("evt_0").is_some(), "a retained delivery keeps its event");
    commit(&mut busy, &mut server);
    assert_in_sync(&busy, &server);
}

#[test]
fn a_segment_name_held_by_a_foreign_object_is_skipped_and_never_deleted() {
    let mut log = new_log(config(10, 8 * 1024, 16));
    let mut server = FakeServer::default();
    log.insert(record(0, DeliveryState::Pending)).unwrap();
    let writes = log.take_writes();
    assert_eq!(names(&writes), [("org-1-dfc76549-journal-1", true)]);
    // Its name is held by something else: the records go again under the next name, and the
    // name is forgotten rather than deleted later as an empty segment of this log.
    log.restore(writes);
    log.forget_segment("org-1-dfc76549-journal-1");
    let writes = log.take_writes();
    assert_eq!(names(&writes), [("org-1-dfc76549-journal-2", true)]);
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);
    let mut r = log.get(&id(0)).unwrap().clone();
    r.state = DeliveryState::Succeeded;
    assert!(log.update(r));
    let writes = log.take_writes();
    assert!(
        names(&writes)
            .iter()
            .all(|(name, _)| *name != "org-1-dfc76549-journal-1"),
        "the foreign name is never written nor deleted: {:?}",
        names(&writes)
    );
    // A segment that still holds live entries is never forgotten.
    log.forget_segment("org-1-dfc76549-journal-3");
    assert!(log.segments().iter().any(|s| !s.ids.is_empty()));
}

#[test]
fn names_held_by_refused_objects_are_skipped_whatever_number_they_claim() {
    let mut log = new_log(config(10, 64 * 1024, 8));
    // A squat at the last number never moves the numbering (no overflow, no wrap-around), one at
    // the next number is skipped, and a name of another organization's log is not this log's.
    log.avoid_name(&journal_segment_name("org_1", u64::MAX));
    log.avoid_name(&journal_segment_name("org_1", 1));
    log.avoid_name(&journal_segment_name("org_2", 2));
    log.avoid_name("org-1-journal-2");
    let mut seqs = Vec::new();
    for n in 0..3 {
        assert!(log.insert(record(n, DeliveryState::Pending)).is_ok());
        let writes = log.take_writes();
        seqs.extend(
            created(&writes)
                .iter()
                .map(|cm| journal_seq(cm.metadata.name.as_deref().unwrap()).unwrap()),
        );
    }
    assert_eq!(seqs, [2, 3, 4]);
}

#[test]
fn a_full_endpoint_stores_new_fan_out_deliveries_failed_and_leaves_others_alone() {
    // 2 segments of 1 KiB: 1 KiB per endpoint, a few pending deliveries.
    let mut log = new_log(config(100, 1024, 2));
    let mut stored_failed = 0;
    for n in 0..20 {
        let mut full = record(n, DeliveryState::Pending);
        full.endpoint_id = "ep-slow".into();
        if log.insert_or_fail_when_full(full).unwrap() {
            stored_failed += 1;
            let kept = log.get(&id(n)).unwrap();
            assert_eq!(kept.state, DeliveryState::Failed);
            assert_eq!(kept.next_attempt_at, None);
            assert_eq!(kept.last_error.as_deref(), Some(BACKLOG_FULL_ERROR));
        }
    }
    assert!(stored_failed > 0 && stored_failed < 20, "{stored_failed}");
    let mut plain = record(20, DeliveryState::Pending);
    plain.endpoint_id = "ep-slow".into();
    assert!(log.insert(plain).is_err(), "plain inserts still refuse");
    let mut other = record(21, DeliveryState::Pending);
    other.endpoint_id = "ep-fast".into();
    assert_eq!(
        log.insert_or_fail_when_full(other),
        Ok(false),
        "another endpoint has room"
    );
}

#[test]
fn a_segment_deleted_and_created_again_is_never_read_back() {
    let mut log = new_log(config(100, 8 * 1024, 4));
    let mut server = FakeServer::default();
    for n in 0..3 {
        log.insert(record(n, DeliveryState::Pending)).unwrap();
    }
    commit(&mut log, &mut server);
    let first = log.segments()[0].name.clone();
    let copy = server.objects[&first].clone();
    // Every delivery of the first segment finishes, in later segments: it holds nothing live and
    // is deleted once the log compacts.
    let mut deleted = false;
    for round in 0..20u32 {
        for n in 0..3 {
            let mut done = log.get(&id(n)).unwrap().clone();
            done.state = DeliveryState::Succeeded;
            done.attempts = round + 1;
            assert!(log.update(done));
        }
        let writes = log.take_writes();
        server.apply(&writes, None).unwrap();
        let gone: Vec<String> = writes.deletes().iter().map(|w| w.name().to_string()).collect();
        deleted |= gone.contains(&first);
        log.confirm_deleted(&gone);
        if deleted {
            break;
        }
    }
    assert!(deleted, "the first segment was compacted away");
    // The confirmed delete raised the floor; the log's next change records it.
    assert!(!log.has_changes(), "no write for the floor alone");
    log.insert(record(50, DeliveryState::Pending)).unwrap();
    commit(&mut log, &mut server);
    // Before the delete was confirmed, a read-back would still read it; after, a byte-for-byte
    // copy (MAC and all) is a replay: ignored, its pending records do not come back, and the
    // next batch deletes it again.
    let mut replayed = server.clone();
    replayed.objects.insert(first.clone(), copy);
    let back = recover(&replayed, config(100, 8 * 1024, 4));
    for n in 0..3 {
        assert_eq!(back.get(&id(n)).unwrap().state, DeliveryState::Succeeded, "{n}");
    }
    assert!(!back.segments().iter().any(|s| s.name == first));
    let mut back = back;
    let again = back.take_writes();
    assert!(again.deletes().iter().any(|w| w.name() == first), "{:?}", names(&again));
    // Without the replay, the log reads back as it is.
    assert_in_sync(&log, &server);
}

#[test]
fn an_idle_log_stops_writing() {
    // Deliveries come, finish and are pruned (one finished kept), segments are compacted away and
    // their deletes confirmed, floors written; then the log goes idle: it must stop writing, even
    // when a floor-only segment ends up the oldest (its delete must not ask for another).
    let mut log = new_log(config(1, 512, 4));
    let mut server = FakeServer::default();
    let step = |log: &mut DeliveryLog, server: &mut FakeServer| {
        let writes = log.take_writes();
        server.apply(&writes, None).unwrap();
        let gone: Vec<String> = writes.deletes().iter().map(|w| w.name().to_string()).collect();
        log.confirm_deleted(&gone);
    };
    for n in 0..30 {
        log.insert(record(n, DeliveryState::Pending)).unwrap();
        step(&mut log, &mut server);
        let mut done = log.get(&id(n)).unwrap().clone();
        done.state = DeliveryState::Succeeded;
        done.attempts = 1;
        log.update(done);
        step(&mut log, &mut server);
    }
    let mut rounds = 0;
    while log.has_changes() {
        rounds += 1;
        assert!(rounds < 10, "an idle log still writes: {:?}", server.names());
        step(&mut log, &mut server);
    }
    assert_in_sync(&log, &server);
}

/// A payload whose bytes no ConfigMap of the server may hold once it is erased.
fn secret_payload() -> Bytes {
    Bytes::from_static(
        br#"{"type":"user.deleted","timestamp":"2026-12-03T00:00:00Z","data":{"email":"ada@example.com"}}"#,
    )
}

fn server_holds(server: &FakeServer, needle: &str) -> bool {
    server
        .objects
        .values()
        .any(|cm| entries(cm).values().any(|v| v.contains(needle)))
}

/// A log whose first segment holds event A (its delivery kept pending) and whose second holds
/// the event to erase, S, with a delivery to each of two endpoints.
fn journal_with_a_secret() -> (DeliveryLog, FakeServer, LogConfig) {
    let cfg = config(10, 256 * 1024, 16);
    let mut log = new_log(cfg.clone());
    let mut server = FakeServer::default();
    log.insert_event("evt_a", payload(10)).unwrap();
    log.insert(delivery(0, "ep1", "evt_a")).unwrap();
    commit(&mut log, &mut server);
    log.insert_event("evt_s", secret_payload()).unwrap();
    log.insert(delivery(1, "ep1", "evt_s")).unwrap();
    log.insert(delivery(2, "ep2", "evt_s")).unwrap();
    commit(&mut log, &mut server);
    (log, server, cfg)
}

#[test]
fn erasing_an_event_deletes_the_segment_holding_its_payload_wherever_it_is() {
    // Segment 3 holds event B: S sits in the middle of the journal.
    let (mut log, mut server, cfg) = journal_with_a_secret();
    finish(&mut log, 1, 50);
    log.insert_event("evt_b", payload(10)).unwrap();
    log.insert(delivery(3, "ep1", "evt_b")).unwrap();
    commit(&mut log, &mut server);
    assert!(server_holds(&server, "ada@example.com"));
    let segments_before = server.names();

    assert_eq!(log.erase_event("evt_s"), Some(vec![id(1), id(2)]));
    assert_eq!(log.erase_event("evt_nope"), None, "no delivery carries it");
    assert!(log.payload("evt_s").is_none());
    assert!(log.payload("evt_a").is_some() && log.payload("evt_b").is_some());
    let writes = log.take_writes();
    let deleted: Vec<&str> = writes.deletes().iter().map(SegmentWrite::name).collect();
    assert_eq!(
        deleted,
        [segments_before[1].as_str()],
        "the segment holding S, not the oldest"
    );
    let copied: Vec<String> = writes
        .creates()
        .iter()
        .flat_map(|w| match w {
            SegmentWrite::Create(cm) => entries(cm).into_keys().collect::<Vec<_>>(),
            SegmentWrite::Delete { .. } => Vec::new(),
        })
        .collect();
    assert!(
        copied.contains(&id(2)),
        "the live delivery it held is copied: {copied:?}"
    );
    assert!(copied.contains(&"evt_s".to_string()), "with the tombstone");
    server.apply(&writes, None).unwrap();
    assert!(
        !server_holds(&server, "ada@example.com"),
        "the payload's bytes are gone"
    );
    assert_in_sync(&log, &server);

    let back = recover(&server, cfg);
    assert!(back.payload("evt_s").is_none(), "still erased after a recovery");
    assert_eq!(back.get(&id(1)), log.get(&id(1)), "the records stay");
    assert_eq!(back.get(&id(2)), log.get(&id(2)));
    assert!(back.payload("evt_a").is_some());
    // Erasing again changes nothing.
    assert_eq!(log.erase_event("evt_s"), Some(vec![id(1), id(2)]));
    assert!(!log.has_changes());
    // The tombstone goes with the last delivery carrying the event.
    assert_eq!(log.remove_endpoint("ep1"), 3);
    assert_eq!(log.remove_endpoint("ep2"), 1);
    assert_eq!(log.event_count(), 0);
}

#[test]
fn a_payload_whose_segment_outlived_its_erasure_is_deleted_again_after_a_recovery() {
    let (mut log, mut server, cfg) = journal_with_a_secret();
    log.erase_event("evt_s").unwrap();
    let writes = log.take_writes();
    // The creates land; the process dies before the delete.
    let creates = writes.creates().len();
    assert!(server.apply(&writes, Some(creates)).is_err());
    assert!(server_holds(&server, "ada@example.com"));

    let mut back = recover(&server, cfg);
    assert!(back.payload("evt_s").is_none(), "the tombstone wins over the payload");
    assert!(back.has_changes(), "the segment holding the payload is to be deleted");
    commit(&mut back, &mut server);
    assert!(!server_holds(&server, "ada@example.com"));
    assert_in_sync(&back, &server);
}

#[test]
fn an_event_erased_before_its_batch_is_written_never_stores_its_payload() {
    let mut log = new_log(config(10, 256 * 1024, 16));
    let mut server = FakeServer::default();
    log.insert_event("evt_s", secret_payload()).unwrap();
    log.insert(delivery(1, "ep1", "evt_s")).unwrap();
    log.erase_event("evt_s").unwrap();
    commit(&mut log, &mut server);
    assert!(!server_holds(&server, "ada@example.com"));
    assert_in_sync(&log, &server);

    // Erased while its batch was in flight: that batch's segment goes with the next one.
    log.insert_event("evt_t", secret_payload()).unwrap();
    log.insert(delivery(2, "ep1", "evt_t")).unwrap();
    let in_flight = log.take_writes();
    log.erase_event("evt_t").unwrap();
    server.apply(&in_flight, None).unwrap();
    assert!(server_holds(&server, "ada@example.com"));
    commit(&mut log, &mut server);
    assert!(!server_holds(&server, "ada@example.com"));
    assert_in_sync(&log, &server);
}

#[test]
fn expired_events_are_those_whose_deliveries_all_finished_and_are_older_than_the_cutoff() {
    let mut log = new_log(config(10, 256 * 1024, 16));
    // evt_1: one delivery, finished, created at 1. evt_2: two deliveries, one still pending.
    // evt_3: finished, created at 30 (after the cutoff).
    log.insert_event("evt_1", payload(1)).unwrap();
    log.insert(delivery(1, "ep1", "evt_1")).unwrap();
    log.insert_event("evt_2", payload(1)).unwrap();
    log.insert(delivery(2, "ep1", "evt_2")).unwrap();
    log.insert(delivery(3, "ep2", "evt_2")).unwrap();
    log.insert_event("evt_3", payload(1)).unwrap();
    log.insert(delivery(30, "ep1", "evt_3")).unwrap();
    finish(&mut log, 1, 40);
    finish(&mut log, 2, 40);
    finish(&mut log, 30, 40);
    assert_eq!(log.expired_events(ts(20)), ["evt_1"]);
    finish(&mut log, 3, 41);
    assert_eq!(log.expired_events(ts(20)), ["evt_1", "evt_2"]);
    assert_eq!(log.expired_events(ts(31)), ["evt_1", "evt_2", "evt_3"]);
    log.erase_event("evt_1").unwrap();
    assert_eq!(
        log.expired_events(ts(20)),
        ["evt_2"],
        "an erased one is not expired again"
    );
}
