//! Unit tests of the image, against a fake API server that applies writes the way the real one does.

use std::collections::BTreeMap;

use serde_json::json;

use super::*;
use crate::delivery_log::record::tests::{record, ts};
use crate::resources::{COMPONENT_LABEL, ENDPOINT_LABEL, MANAGED_BY_LABEL, ORGANIZATION_LABEL};

/// ConfigMap name → data, as the API server would hold them.
#[derive(Default, Debug)]
struct FakeServer {
    objects: BTreeMap<String, ConfigMap>,
    calls: usize,
}

impl FakeServer {
    /// Applies writes in order, like `store::apply`; fails at write number `fail_at` (0-based).
    fn apply(&mut self, writes: &PendingWrites, fail_at: Option<usize>) -> Result<(), ()> {
        for (i, write) in writes.writes().iter().enumerate() {
            if fail_at == Some(i) {
                return Err(());
            }
            self.calls += 1;
            match write {
                SegmentWrite::Create(cm) => {
                    let name = cm.metadata.name.clone().unwrap();
                    match self.objects.get_mut(&name) {
                        // 409, then a merge patch of its data.
                        Some(existing) => {
                            self.calls += 1;
                            let data = existing.data.get_or_insert_default();
                            data.extend(cm.data.clone().unwrap_or_default());
                        }
                        None => {
                            self.objects.insert(name, cm.clone());
                        }
                    }
                }
                SegmentWrite::Patch { name, patch } => {
                    let Some(existing) = self.objects.get_mut(name) else {
                        return Err(()); // 404
                    };
                    let data = existing.data.get_or_insert_default();
                    for (key, value) in patch["data"].as_object().unwrap() {
                        match value {
                            Value::Null => {
                                data.remove(key);
                            }
                            Value::String(s) => {
                                data.insert(key.clone(), s.clone());
                            }
                            other => panic!("unexpected patch value {other}"),
                        }
                    }
                }
                SegmentWrite::Delete { name } => {
                    self.objects.remove(name);
                }
            }
        }
        Ok(())
    }

    fn configmaps(&self) -> Vec<ConfigMap> {
        self.objects.values().cloned().collect()
    }

    fn data(&self, name: &str) -> BTreeMap<String, String> {
        self.objects[name].data.clone().unwrap_or_default()
    }
}

fn config(max_finished: usize, segment_bytes: usize, max_segments: usize) -> LogConfig {
    LogConfig {
        max_finished,
        segment_bytes,
        max_segments,
    }
}

fn new_log(config: LogConfig) -> EndpointLog {
    EndpointLog::new("ns1", "ep1", "uid-1", "org_1", config)
}

fn recover(server: &FakeServer, config: LogConfig) -> EndpointLog {
    EndpointLog::from_configmaps("ns1", "ep1", "uid-1", "org_1", config, server.configmaps())
}

/// Commits the image's changes to the server; returns the number of writes.
fn commit(log: &mut EndpointLog, server: &mut FakeServer) -> usize {
    let writes = log.take_writes();
    server.apply(&writes, None).unwrap();
    writes.len()
}

/// The server holds exactly what the image says, record for record.
fn assert_in_sync(log: &EndpointLog, server: &FakeServer) {
    assert!(!log.has_changes());
    let segments = log.segments();
    let names: BTreeSet<&str> = segments.iter().map(|s| s.name.as_str()).collect();
    let on_server: BTreeSet<&str> = server.objects.keys().map(String::as_str).collect();
    assert_eq!(names, on_server);
    for segment in segments {
        let data = server.data(&segment.name);
        assert_eq!(data.keys().cloned().collect::<Vec<_>>(), segment.ids);
        for (id, value) in data {
            assert_eq!(value, log.get(&id).unwrap().to_stored());
        }
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

fn with_padding(n: u32, bytes: usize) -> DeliveryRecord {
    let mut r = record(n, DeliveryState::Pending);
    r.payload["data"]["padding"] = json!("p".repeat(bytes));
    r
}

#[test]
fn new_segments_carry_labels_owner_and_every_record() {
    let mut log = new_log(LogConfig::default());
    for n in 0..3 {
        log.insert(record(n, DeliveryState::Pending)).unwrap();
    }
    let writes = log.take_writes();
    assert_eq!(writes.len(), 1);
    let SegmentWrite::Create(cm) = &writes.writes()[0] else {
        panic!("expected a create")
    };
    assert_eq!(cm.metadata.name.as_deref(), Some("ep1-deliveries-1"));
    assert_eq!(cm.metadata.namespace.as_deref(), Some("ns1"));
    let labels = cm.metadata.labels.as_ref().unwrap();
    assert_eq!(labels[MANAGED_BY_LABEL], "capy-webhooks");
    assert_eq!(labels[COMPONENT_LABEL], "delivery-log");
    assert_eq!(labels[ENDPOINT_LABEL], "ep1");
    assert_eq!(labels[ORGANIZATION_LABEL], "org_1");
    let owner = &cm.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (
            owner.api_version.as_str(),
            owner.kind.as_str(),
            owner.name.as_str(),
            owner.uid.as_str()
        ),
        ("webhooks.capydb.io/v1", "WebhookEndpoint", "ep1", "uid-1")
    );
    assert_eq!(
        (owner.controller, owner.block_owner_deletion),
        (Some(false), Some(false))
    );
    let data = cm.data.as_ref().unwrap();
    assert_eq!(data.len(), 3);
    let first = record(0, DeliveryState::Pending);
    assert_eq!(data[&first.id], first.to_stored());
    let mut ids: Vec<&str> = writes.record_ids().collect();
    ids.sort();
    assert_eq!(ids.len(), 3);
    assert_eq!(ids[0], first.id);
    assert!(log.take_writes().is_empty());

    // Without a uid, no owner reference (the API server refuses an empty one).
    let mut orphan = EndpointLog::new("ns1", "ep1", "", "org_1", LogConfig::default());
    orphan.insert(record(0, DeliveryState::Pending)).unwrap();
    let writes = orphan.take_writes();
    let SegmentWrite::Create(cm) = &writes.writes()[0] else {
        panic!("expected a create")
    };
    assert!(cm.metadata.owner_references.is_none());
}

#[test]
fn segments_roll_over_at_the_byte_budget() {
    let budget = 8 * 1024;
    let mut log = new_log(config(100, budget, 16));
    let mut server = FakeServer::default();
    let size = with_padding(0, 1000).stored_len() + GROWTH_RESERVE;
    let per_segment = budget / size;
    assert!(per_segment >= 2);
    for n in 0..(3 * per_segment as u32 + 1) {
        log.insert(with_padding(n, 1000)).unwrap();
    }
    let segments = log.segments();
    assert_eq!(segments.len(), 4);
    for s in &segments[..3] {
        assert_eq!(s.ids.len(), per_segment);
        assert!(s.bytes + GROWTH_RESERVE * s.ids.len() <= budget);
    }
    assert_eq!(segments[3].ids.len(), 1);
    assert_eq!(segments[3].name, "ep1-deliveries-4");
    assert_eq!(log.approx_bytes(), segments.iter().map(|s| s.bytes).sum::<usize>());

    let writes = log.take_writes();
    assert_eq!(writes.len(), 4);
    assert!(writes.writes().iter().all(|w| matches!(w, SegmentWrite::Create(_))));
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);

    // A record larger than the budget gets a segment of its own.
    let big = with_padding(1000, 2 * budget);
    let big_size = big.stored_len();
    log.insert(big).unwrap();
    let last = log.segments().pop().unwrap();
    assert_eq!((last.ids.len(), last.bytes), (1, big_size));
}

#[test]
fn log_full_at_max_segments_then_older_segments_with_room_are_used() {
    let budget = 4 * 1024;
    let mut log = new_log(config(0, budget, 2));
    let mut n = 0;
    let full = loop {
        match log.insert(with_padding(n, 500)) {
            Ok(()) => n += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(full, LogFull);
    assert_eq!(log.segment_count(), 2);
    assert_eq!(log.len(), n as usize);
    assert!(log.get(&with_padding(n, 500).id).is_none());

    // Finishing (and so pruning, max_finished = 0) the first segment's first record makes room there.
    let first = log.segments()[0].ids[0].clone();
    let mut done = log.get(&first).unwrap().clone();
    done.state = DeliveryState::Succeeded;
    assert!(log.update(done));
    assert!(log.get(&first).is_none());
    log.insert(with_padding(n, 500)).unwrap();
    assert!(log.segments()[0].ids.contains(&with_padding(n, 500).id));
    assert_eq!(log.segment_count(), 2);

    // Records that could never be stored are refused too.
    let mut bad = record(5000, DeliveryState::Pending);
    bad.id = "msg/with/slashes".into();
    assert_eq!(new_log(LogConfig::default()).insert(bad), Err(LogFull));
    let huge = with_padding(5001, MAX_RECORD_BYTES);
    assert_eq!(new_log(LogConfig::default()).insert(huge), Err(LogFull));
}

#[test]
fn retention_prunes_the_oldest_finished_and_never_pending() {
    let mut log = new_log(config(3, 256 * 1024, 16));
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
    let kept: Vec<u32> = [10, 12, 14].into();
    for n in 10..15 {
        assert_eq!(
            log.get(&record(n, DeliveryState::Pending).id).is_some(),
            kept.contains(&n),
            "record {n}"
        );
    }
    assert_eq!(log.pending().count(), 5);

    // A pending record finishing with a recent time evicts the oldest finished one (14, at 30).
    let mut done = finished(0, DeliveryState::Failed, 60);
    done.attempts = 8;
    assert!(log.update(done));
    assert!(log.get(&record(14, DeliveryState::Pending).id).is_none());
    assert_eq!((log.finished_count(), log.pending_count()), (3, 4));

    // Retrying a finished record makes it pending again: it is no longer subject to retention.
    let mut again = log.get(&record(12, DeliveryState::Pending).id).unwrap().clone();
    again.state = DeliveryState::Pending;
    assert!(log.update(again));
    assert_eq!((log.finished_count(), log.pending_count()), (2, 5));

    // Many pending records, none pruned.
    let mut busy = new_log(config(0, 256 * 1024, 16));
    for n in 0..200 {
        busy.insert(record(n, DeliveryState::Pending)).unwrap();
    }
    assert_eq!(busy.len(), 200);
    assert!(
        !busy.update(record(999, DeliveryState::Pending)),
        "unknown ids are not updated"
    );
}

#[test]
fn take_writes_is_minimal() {
    let budget = 8 * 1024;
    let mut log = new_log(config(100, budget, 16));
    let mut server = FakeServer::default();
    for n in 0..20 {
        log.insert(with_padding(n, 600)).unwrap();
    }
    assert!(log.segment_count() >= 2);
    assert_eq!(commit(&mut log, &mut server), log.segment_count());
    assert_in_sync(&log, &server);
    assert!(log.take_writes().is_empty());

    // Two updates of one record: one patch, one key, other segments untouched.
    let id = with_padding(1, 600).id;
    let mut r = log.get(&id).unwrap().clone();
    r.attempts = 1;
    r.last_error = Some("connection refused".into());
    assert!(log.update(r.clone()));
    r.attempts = 2;
    r.last_error = Some("timeout".into());
    assert!(log.update(r.clone()));
    let writes = log.take_writes();
    assert_eq!(writes.len(), 1);
    let SegmentWrite::Patch { name, patch } = &writes.writes()[0] else {
        panic!("expected a patch")
    };
    assert_eq!(name, "ep1-deliveries-1");
    assert_eq!(patch, &json!({"data": {id.clone(): r.to_stored()}}));
    assert_eq!(writes.record_ids().collect::<Vec<_>>(), [id.as_str()]);
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);

    // A record inserted and pruned within one batch costs nothing.
    let mut log = new_log(config(0, budget, 16));
    let mut server = FakeServer::default();
    log.insert(record(1, DeliveryState::Pending)).unwrap();
    commit(&mut log, &mut server);
    log.insert(record(2, DeliveryState::Pending)).unwrap();
    assert!(log.update(finished(2, DeliveryState::Succeeded, 100)));
    assert!(log.get(&record(2, DeliveryState::Pending).id).is_none());
    assert!(log.take_writes().is_empty());

    // A new segment and updates of existing ones in one batch: one write each.
    let mut log = new_log(config(100, budget, 16));
    let mut server = FakeServer::default();
    for n in 0..20 {
        log.insert(with_padding(n, 600)).unwrap();
    }
    commit(&mut log, &mut server);
    let segments = log.segment_count();
    for n in 0..20 {
        let mut r = log.get(&with_padding(n, 600).id).unwrap().clone();
        r.attempts = 1;
        log.update(r);
    }
    for n in 20..30 {
        log.insert(with_padding(n, 600)).unwrap();
    }
    let writes = log.take_writes();
    let names: BTreeSet<&str> = writes.writes().iter().map(SegmentWrite::name).collect();
    assert_eq!(names.len(), writes.len(), "one write per segment");
    assert_eq!(writes.len(), log.segment_count());
    let kinds: Vec<bool> = writes
        .writes()
        .iter()
        .map(|w| matches!(w, SegmentWrite::Create(_)))
        .collect();
    assert!(kinds.is_sorted_by(|a, b| a >= b), "creates come first");
    assert!(log.segment_count() > segments);
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);
}

#[test]
fn emptied_segments_are_deleted_and_unwritten_ones_never_written() {
    let budget = 4 * 1024;
    let mut log = new_log(config(0, budget, 16));
    let mut server = FakeServer::default();

    // Created and emptied within one batch: no write at all.
    for n in 0..10 {
        log.insert(with_padding(n, 500)).unwrap();
    }
    assert!(log.segment_count() >= 2);
    for n in 0..10 {
        let mut r = log.get(&with_padding(n, 500).id).unwrap().clone();
        r.state = DeliveryState::Succeeded;
        log.update(r);
    }
    assert!(log.is_empty());
    assert!(!log.has_changes());
    assert!(log.take_writes().is_empty());

    // Written, then emptied: one delete per segment, no patch.
    for n in 10..20 {
        log.insert(with_padding(n, 500)).unwrap();
    }
    let segments = commit(&mut log, &mut server);
    assert!(segments >= 2);
    for n in 10..20 {
        let mut r = log.get(&with_padding(n, 500).id).unwrap().clone();
        r.state = DeliveryState::Failed;
        log.update(r);
    }
    let writes = log.take_writes();
    assert_eq!(writes.len(), segments);
    assert!(writes.writes().iter().all(|w| matches!(w, SegmentWrite::Delete { .. })));
    assert_eq!(writes.removed_ids().count(), 10);
    server.apply(&writes, None).unwrap();
    assert!(server.objects.is_empty());
    assert_in_sync(&log, &server);

    // An emptied segment that gets a new record before the batch is patched, not deleted.
    log.insert(record(30, DeliveryState::Pending)).unwrap();
    commit(&mut log, &mut server);
    log.update(finished(30, DeliveryState::Succeeded, 99));
    log.insert(record(31, DeliveryState::Pending)).unwrap();
    let writes = log.take_writes();
    assert_eq!(writes.len(), 1);
    assert!(matches!(&writes.writes()[0], SegmentWrite::Patch { .. }));
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);
}

#[test]
fn restore_after_a_failure_writes_everything_again() {
    let budget = 8 * 1024;
    let mut log = new_log(config(2, budget, 16));
    let mut server = FakeServer::default();

    // A failed create stays a create, now with the records added since.
    log.insert(record(1, DeliveryState::Pending)).unwrap();
    let writes = log.take_writes();
    assert!(server.apply(&writes, Some(0)).is_err());
    log.restore(writes);
    assert!(log.has_changes());
    log.insert(record(2, DeliveryState::Pending)).unwrap();
    let writes = log.take_writes();
    assert_eq!(writes.len(), 1);
    let SegmentWrite::Create(cm) = &writes.writes()[0] else {
        panic!("expected a create")
    };
    assert_eq!(cm.data.as_ref().unwrap().len(), 2);
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);

    // A batch applied only in part (a create done, a patch failed): everything is written again.
    for n in 3..12 {
        log.insert(with_padding(n, 600)).unwrap();
    }
    assert!(log.update(finished(1, DeliveryState::Succeeded, 100)));
    let writes = log.take_writes();
    assert!(writes.len() >= 2);
    let first_patch = writes
        .writes()
        .iter()
        .position(|w| matches!(w, SegmentWrite::Patch { .. }))
        .unwrap();
    assert!(server.apply(&writes, Some(first_patch)).is_err());
    log.restore(writes);
    // Meanwhile, records finish and the oldest finished one is pruned.
    assert!(log.update(finished(2, DeliveryState::Succeeded, 101)));
    assert!(log.update(finished(3, DeliveryState::Succeeded, 102)));
    assert!(log.get(&record(1, DeliveryState::Pending).id).is_none());
    let writes = log.take_writes();
    assert!(writes.writes().iter().all(|w| matches!(w, SegmentWrite::Create(_))));
    let names: BTreeSet<&str> = writes.writes().iter().map(SegmentWrite::name).collect();
    assert_eq!(names.len(), writes.len());
    server.apply(&writes, None).unwrap();
    // The pruned key was re-created by the merge of an earlier create: the next batch nulls it.
    let stale = record(1, DeliveryState::Pending).id;
    assert!(server.data("ep1-deliveries-1").contains_key(&stale));
    let writes = log.take_writes();
    assert_eq!(writes.len(), 1);
    let SegmentWrite::Patch { patch, .. } = &writes.writes()[0] else {
        panic!("expected a patch")
    };
    assert_eq!(patch, &json!({"data": {stale: null}}));
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);

    // A segment deleted behind the log's back: the patch fails (404), the restored batch recreates it.
    let victim = log.segments()[0].name.clone();
    server.objects.remove(&victim);
    let id = log.segments()[0].ids[0].clone();
    let mut r = log.get(&id).unwrap().clone();
    r.attempts += 1;
    log.update(r);
    let writes = log.take_writes();
    assert!(server.apply(&writes, None).is_err());
    log.restore(writes);
    let writes = log.take_writes();
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);

    // A failed delete is deleted again.
    let mut log = new_log(config(0, budget, 16));
    let mut server = FakeServer::default();
    log.insert(record(1, DeliveryState::Pending)).unwrap();
    commit(&mut log, &mut server);
    log.update(finished(1, DeliveryState::Succeeded, 100));
    let writes = log.take_writes();
    assert!(matches!(writes.writes(), [SegmentWrite::Delete { .. }]));
    log.restore(writes);
    // The segment being deleted takes no new record.
    log.insert(record(2, DeliveryState::Pending)).unwrap();
    let writes = log.take_writes();
    let kinds: Vec<(&str, bool)> = writes
        .writes()
        .iter()
        .map(|w| (w.name(), matches!(w, SegmentWrite::Delete { .. })))
        .collect();
    assert_eq!(kinds, [("ep1-deliveries-2", false), ("ep1-deliveries-1", true)]);
    server.apply(&writes, None).unwrap();
    assert_in_sync(&log, &server);
}

#[test]
fn recovery_rebuilds_an_identical_image() {
    let cfg = config(20, 8 * 1024, 16);
    let mut log = new_log(cfg.clone());
    let mut server = FakeServer::default();
    let mut updated = 1000;
    for round in 0..10u32 {
        for n in round * 10..round * 10 + 10 {
            log.insert(with_padding(n, 300)).unwrap();
        }
        // Finish the previous round's records.
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
            log.update(r);
        }
        commit(&mut log, &mut server);
        assert_in_sync(&log, &server);
    }
    assert_eq!((log.pending_count(), log.finished_count()), (10, 20));

    let mut back = recover(&server, cfg.clone());
    assert_eq!(back.segments(), log.segments());
    assert_eq!(back.records().collect::<Vec<_>>(), log.records().collect::<Vec<_>>());
    assert_eq!(back.newest_first(7), log.newest_first(7));
    assert_eq!(back.approx_bytes(), log.approx_bytes());
    assert!(back.take_writes().is_empty());

    // New segments continue the numbering.
    let last = log.segments().last().unwrap().name.clone();
    let last_seq = crate::delivery_log::segment_seq(&last).unwrap();
    for n in 500..540 {
        back.insert(with_padding(n, 300)).unwrap();
    }
    let names: Vec<String> = back.segments().into_iter().map(|s| s.name).collect();
    assert!(names.contains(&format!("ep1-deliveries-{}", last_seq + 1)));
}

#[test]
fn recovery_skips_corrupt_keys_and_keeps_the_newest_duplicate() {
    let cfg = config(100, 4 * 1024, 16);
    let mut log = new_log(cfg.clone());
    let mut server = FakeServer::default();
    for n in 0..12 {
        log.insert(with_padding(n, 500)).unwrap();
    }
    commit(&mut log, &mut server);
    let names: Vec<String> = server.objects.keys().cloned().collect();
    assert!(names.len() >= 2);

    // A corrupt value, a value whose id differs from its key, and a stale copy of record 0 in the
    // second segment next to a newer copy in the first.
    let first = names[0].clone();
    let second = names[1].clone();
    let original = with_padding(0, 500);
    let mut newer = original.clone();
    newer.attempts = 3;
    newer.updated_at = ts(500);
    {
        let data = server.objects.get_mut(&first).unwrap().data.as_mut().unwrap();
        data.insert(original.id.clone(), newer.to_stored());
        data.insert("msg_corrupt".into(), "{not json".into());
        data.insert("msg_other".into(), record(77, DeliveryState::Pending).to_stored());
        let data = server.objects.get_mut(&second).unwrap().data.as_mut().unwrap();
        data.insert(original.id.clone(), original.to_stored());
    }
    // A segment of another endpoint incarnation (other uid) is not adopted.
    let mut foreign = server.objects[&second].clone();
    foreign.metadata.name = Some("ep1-deliveries-40".into());
    foreign.metadata.owner_references.as_mut().unwrap()[0].uid = "uid-old".into();
    foreign.data = Some(BTreeMap::from([(
        "msg_x".to_string(),
        record(88, DeliveryState::Pending).to_stored(),
    )]));
    let mut cms = server.configmaps();
    cms.push(foreign);

    let mut back = EndpointLog::from_configmaps("ns1", "ep1", "uid-1", "org_1", cfg, cms);
    assert_eq!(back.len(), 12);
    assert_eq!(back.get(&original.id), Some(&newer));
    assert!(back.get("msg_corrupt").is_none() && back.get("msg_other").is_none());
    assert!(back.get(&record(88, DeliveryState::Pending).id).is_none());
    let segments = back.segments();
    assert!(segments[0].ids.contains(&original.id) && !segments[1].ids.contains(&original.id));

    // The next batch removes only the stale copy; undecodable keys are left alone.
    let writes = back.take_writes();
    assert_eq!(writes.len(), 1);
    let SegmentWrite::Patch { name, patch } = &writes.writes()[0] else {
        panic!("expected a patch")
    };
    assert_eq!(name, &second);
    assert_eq!(patch, &json!({"data": {original.id.clone(): null}}));
    server.apply(&writes, None).unwrap();
    assert!(server.data(&first).contains_key("msg_corrupt"));

    // New segments never reuse a name that exists, even one skipped.
    for n in 100..120 {
        back.insert(with_padding(n, 500)).unwrap();
    }
    assert!(back.segments().iter().all(|s| s.name != "ep1-deliveries-40"));
    assert!(back.segments().iter().any(|s| s.name == "ep1-deliveries-41"));
}

#[test]
fn updates_never_take_a_segment_past_the_hard_limit() {
    let mut log = new_log(config(10_000, MAX_SEGMENT_BYTES * 4, 16));
    let mut n = 0;
    while log.segment_count() < 2 {
        log.insert(record(n, DeliveryState::Pending)).unwrap();
        n += 1;
    }
    let first = log.segments()[0].clone();
    assert!(first.bytes <= MAX_SEGMENT_BYTES, "segment_bytes is clamped");
    // Every record of the first segment fails with a long error of 4-byte characters.
    for id in &first.ids {
        let mut r = log.get(id).unwrap().clone();
        r.attempts = 1;
        r.last_error = Some("🦫".repeat(2000));
        assert!(log.update(r));
    }
    let first = log.segments()[0].clone();
    assert!(first.bytes <= HARD_SEGMENT_BYTES, "{} bytes", first.bytes);
    let errors: Vec<usize> = first
        .ids
        .iter()
        .map(|id| {
            log.get(id)
                .unwrap()
                .last_error
                .as_deref()
                .map_or(0, |e| e.chars().count())
        })
        .collect();
    assert_eq!(errors[0], MAX_ERROR_CHARS_FOR_TEST);
    assert!(
        errors.iter().any(|&c| c < MAX_ERROR_CHARS_FOR_TEST),
        "later errors were shortened"
    );
}

const MAX_ERROR_CHARS_FOR_TEST: usize = crate::delivery_log::MAX_ERROR_CHARS;

#[test]
fn newest_first_orders_by_creation_then_id() {
    let mut log = new_log(LogConfig::default());
    for n in [3, 1, 2] {
        log.insert(record(n, DeliveryState::Pending)).unwrap();
    }
    let mut same_time = record(4, DeliveryState::Pending);
    same_time.created_at = ts(3);
    log.insert(same_time).unwrap();
    let ids: Vec<&str> = log.newest_first(3).into_iter().map(|r| r.id.as_str()).collect();
    let id = |n| record(n, DeliveryState::Pending).id;
    assert_eq!(ids, [id(4), id(3), id(2)]);
    assert_eq!(log.newest_first(100).len(), 4);
    assert!(log.newest_first(0).is_empty());
}
