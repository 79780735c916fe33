//! The delivery log against a real kube-apiserver (and kube-controller-manager's garbage collector).

mod support;

use std::time::Duration;

use bytes::Bytes;
use capy_webhooks::delivery_log::{
    self, DeliveryLog, DeliveryRecord, DeliveryState, LogConfig, LogKey, PendingWrites, SegmentWrite, new_delivery_id,
};
use capy_webhooks::resources::{ORGANIZATION_LABEL, Scope};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ListParams;
use kube::{Api, Client};
use serde_json::json;

const ORG: &str = "org_dlog";
const ONE_MIB: usize = 1024 * 1024;

async fn setup(prefix: &str) -> (Client, String) {
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, prefix).await;
    (client, ns)
}

/// Adds event `n` and its delivery to `endpoint`; returns the delivery.
fn add(log: &mut DeliveryLog, endpoint: &str, now: Timestamp, n: usize) -> DeliveryRecord {
    let event_id = format!("evt_{n:06}");
    let payload = json!({
        "type": "database.created",
        "timestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        "data": {"database_id": format!("db_{n}"), "event": event_id, "notes": "x".repeat(400)},
    });
    log.insert_event(&event_id, Bytes::from(payload.to_string())).unwrap();
    let record = DeliveryRecord::pending(
        new_delivery_id(now),
        endpoint,
        ORG,
        (&event_id, "database.created"),
        8,
        now,
    );
    log.insert(record.clone()).unwrap();
    log.get(&record.id).unwrap().clone()
}

/// The outcome of one attempt: most succeed, every fifth fails for good.
fn finish(mut record: DeliveryRecord, now: Timestamp, n: usize) -> DeliveryRecord {
    record.attempts += 1;
    record.updated_at = now;
    record.next_attempt_at = None;
    if n.is_multiple_of(5) {
        record.state = DeliveryState::Failed;
        record.response_status = Some(503);
        record.last_error = Some("HTTP 503 Service Unavailable: upstream overloaded".into());
    } else {
        record.state = DeliveryState::Succeeded;
        record.delivered_at = Some(now);
        record.response_status = Some(204);
    }
    record
}

/// Bytes of a ConfigMap's data, as the API server's 1 MiB limit counts them.
fn data_bytes(cm: &ConfigMap) -> usize {
    delivery_log::segment_entries(cm)
        .unwrap()
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum()
}

/// What the API server stores of a segment: its object as JSON (the packed entries in base64).
fn object_bytes(cm: &ConfigMap) -> usize {
    serde_json::to_vec(cm).unwrap().len()
}

async fn segments_of(client: &Client, ns: &str) -> Vec<ConfigMap> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let selector = format!("{},{ORGANIZATION_LABEL}={ORG}", delivery_log::log_selector());
    api.list(&ListParams::default().labels(&selector)).await.unwrap().items
}

async fn recover(client: &Client, ns: &str, config: &LogConfig) -> DeliveryLog {
    let all = delivery_log::load_all(client, &Scope::Namespace(ns.to_string()))
        .await
        .unwrap();
    let mut groups = delivery_log::group_by_organization(all);
    let mine = groups.remove(&(ns.to_string(), ORG.to_string())).unwrap_or_default();
    DeliveryLog::from_configmaps(ns, ORG, config.clone(), mine)
}

fn assert_same_image(a: &DeliveryLog, b: &DeliveryLog) {
    assert_eq!(a.segments(), b.segments());
    assert_eq!(a.records().collect::<Vec<_>>(), b.records().collect::<Vec<_>>());
    assert_eq!(
        (a.pending_count(), a.approx_bytes(), a.event_count()),
        (b.pending_count(), b.approx_bytes(), b.event_count())
    );
}

/// The MAC key these tests write with (they apply unsigned batches; the key only judges a name
/// conflict).
fn test_key() -> LogKey {
    LogKey::from_bytes([3; 32])
}

/// Takes the batch and applies it; returns (writes, API calls).
async fn commit(client: &Client, ns: &str, log: &mut DeliveryLog) -> (usize, usize) {
    let writes = log.take_writes();
    let calls = delivery_log::apply(client, ns, &test_key(), &writes).await.unwrap();
    (writes.len(), calls)
}

#[tokio::test]
async fn a_thousand_deliveries_take_few_writes_stay_bounded_recover_and_are_collected() {
    let (client, ns) = setup("dlog").await;
    let endpoint = "ep-dlog";
    let config = LogConfig {
        max_finished: 100,
        segment_bytes: 64 * 1024,
        max_segments: 16,
    };
    let mut log = DeliveryLog::new(&ns, ORG, config.clone());

    // 10 batches of 100 new pending deliveries; each batch also finishes the previous 100.
    let start = Timestamp::now();
    let mut clock = 0i64;
    let mut tick = || {
        clock += 1;
        start + SignedDuration::from_millis(clock)
    };
    let (mut writes, mut calls, mut max_record) = (0, 0, 0);
    let mut previous: Vec<String> = Vec::new();
    let mut max_segment_bytes = 0;
    let mut max_segments = 0;
    let mut per_round = Vec::new();
    for round in 0..10 {
        let mut ids = Vec::new();
        for i in 0..100 {
            let n = round * 100 + i;
            let record = add(&mut log, endpoint, tick(), n);
            max_record = max_record.max(record.stored_len());
            ids.push(record.id.clone());
        }
        for (i, id) in previous.iter().enumerate() {
            let done = finish(log.get(id).unwrap().clone(), tick(), i);
            max_record = max_record.max(done.stored_len());
            assert!(log.update(done));
        }
        previous = ids;
        let (w, c) = commit(&client, &ns, &mut log).await;
        // New events and records fill ~2 segments, outcomes ~1 more, emptied ones are deleted.
        assert!(w <= 6, "round {round}: {w} writes");
        per_round.push(w);
        writes += w;
        calls += c;

        let on_server = segments_of(&client, &ns).await;
        assert_eq!(on_server.len(), log.segment_count(), "round {round}");
        max_segments = max_segments.max(on_server.len());
        for cm in &on_server {
            let bytes = data_bytes(cm);
            assert!(object_bytes(cm) < ONE_MIB);
            assert!(
                bytes <= config.segment_bytes + max_record,
                "round {round}: {bytes} bytes"
            );
            max_segment_bytes = max_segment_bytes.max(bytes);
        }

        if round == 4 {
            // Recovery in the middle of the run rebuilds the same image, which carries on.
            let back = recover(&client, &ns, &config).await;
            assert_same_image(&back, &log);
            log = back;
            assert!(log.take_writes().is_empty());
        }
    }
    for (i, id) in previous.iter().enumerate() {
        let done = finish(log.get(id).unwrap().clone(), tick(), i);
        assert!(log.update(done));
    }
    let (w, c) = commit(&client, &ns, &mut log).await;
    writes += w;
    calls += c;

    // Retention: the newest 100 finished deliveries are kept, nothing is pending.
    assert_eq!((log.len(), log.finished_count(), log.pending_count()), (100, 100, 0));
    let on_server = segments_of(&client, &ns).await;
    let keys: Vec<String> = on_server
        .iter()
        .flat_map(|cm| delivery_log::segment_entries(cm).unwrap().into_keys())
        .collect();
    // The retained deliveries' events keep the segments they came in alive, and with them the
    // superseded pending copies written beside them: bounded by the segment count, never more.
    let delivery_keys = keys.iter().filter(|k| k.starts_with("msg_")).count();
    assert!(
        (100..=300).contains(&delivery_keys),
        "{delivery_keys} delivery copies stored"
    );
    assert!(on_server.len() <= config.max_segments);
    let mut events: Vec<&String> = keys.iter().filter(|k| k.starts_with("evt_")).collect();
    events.sort();
    events.dedup();
    assert_eq!(events.len(), 100, "the events of the retained deliveries");
    assert!(calls <= 70, "{calls} API calls for 1,000 deliveries");
    eprintln!(
        "[delivery_log] 1,000 deliveries + 1,000 outcomes: {writes} writes, {calls} API calls; \
         largest segment {max_segment_bytes} bytes (budget {}), at most {max_segments} segments; \
         largest record {max_record} bytes; final {} segments, {} bytes; writes per batch {per_round:?}",
        config.segment_bytes,
        on_server.len(),
        on_server.iter().map(data_bytes).sum::<usize>()
    );

    let back = recover(&client, &ns, &config).await;
    assert_same_image(&back, &log);

    // The REST read without a dispatcher: newest first, limited, with payloads.
    let read = delivery_log::read_organization(&client, &ns, ORG, config.clone())
        .await
        .unwrap();
    let page: Vec<DeliveryRecord> = read.newest_first(endpoint, 25).into_iter().cloned().collect();
    let expected: Vec<DeliveryRecord> = log.newest_first(endpoint, 25).into_iter().cloned().collect();
    assert_eq!(page, expected);
    assert!(page.windows(2).all(|w| w[0].created_at >= w[1].created_at));
    assert_eq!(
        read.payload_json(&page[0].event_id).unwrap()["data"]["event"],
        "evt_000999"
    );
    assert_eq!(read.newest_first(endpoint, 1000).len(), 100);
    assert!(read.newest_first("no-such-endpoint", 10).is_empty());

    // The endpoint is deleted: the dispatcher removes its deliveries, and the next batch deletes
    // every segment (the events went with them).
    assert_eq!(log.remove_endpoint(endpoint), 100);
    assert_eq!(log.event_count(), 0);
    commit(&client, &ns, &mut log).await;
    assert!(segments_of(&client, &ns).await.is_empty());
    support::delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn a_failed_batch_is_restored_and_written_again() {
    let (client, ns) = setup("dlog-restore").await;
    let endpoint = "ep-restore";
    let config = LogConfig {
        max_finished: 10,
        segment_bytes: 16 * 1024,
        max_segments: 16,
    };
    let mut log = DeliveryLog::new(&ns, ORG, config.clone());
    let now = Timestamp::now();
    for n in 0..60 {
        add(&mut log, endpoint, now + SignedDuration::from_millis(n), n as usize);
    }
    commit(&client, &ns, &mut log).await;
    let segments = log.segments();
    assert!(segments.len() >= 3);

    // The API server refuses every ConfigMap create: the batch carrying two outcomes fails.
    support::block_configmap_creates(&client, &ns).await;
    // Segments hold events first (ids sort `evt_` before `msg_`): take deliveries from the first and
    // last segments that hold any.
    let deliveries: Vec<&String> = segments
        .iter()
        .flat_map(|s| s.ids.iter().filter(|i| i.starts_with("msg_")))
        .collect();
    let in_first = deliveries[0].clone();
    let done = finish(log.get(&in_first).unwrap().clone(), Timestamp::now(), 1);
    assert!(log.update(done));
    let in_last = deliveries[deliveries.len() - 1].clone();
    let mut retried = log.get(&in_last).unwrap().clone();
    retried.attempts = 1;
    retried.last_error = Some("connection refused".into());
    assert!(log.update(retried));
    let writes: PendingWrites = log.take_writes();
    assert_eq!(writes.len(), 1, "one new segment with both records");
    let failed_name = writes.writes()[0].name().to_string();
    assert!(matches!(&writes.writes()[0], SegmentWrite::Create(_)));
    match delivery_log::apply(&client, &ns, &test_key(), &writes).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    log.restore(writes);
    assert!(log.has_changes());

    // Without the quota, the next batch writes both records again, into a segment of a new name,
    // then deletes the failed one (a create refused here, but one whose answer was lost exists).
    support::unblock_configmap_creates(&client, &ns).await;
    let writes = log.take_writes();
    assert_eq!(writes.len(), 2);
    assert_ne!(writes.writes()[0].name(), failed_name);
    assert!(matches!(&writes.writes()[1], SegmentWrite::Delete { name } if *name == failed_name));
    let mut stored: Vec<&str> = writes.record_ids().collect();
    stored.sort();
    let mut expected = vec![in_first.as_str(), in_last.as_str()];
    expected.sort();
    assert_eq!(stored, expected);
    // The API server may still hold the quota for a moment: the same batch is simply sent again.
    support::wait_for(
        "the create accepted once the quota is gone",
        Duration::from_secs(30),
        || {
            let (client, ns, writes) = (client.clone(), ns.clone(), writes.clone());
            async move { delivery_log::apply(&client, &ns, &test_key(), &writes).await.ok() }
        },
    )
    .await;
    let back = recover(&client, &ns, &config).await;
    assert_eq!(back.records().collect::<Vec<_>>(), log.records().collect::<Vec<_>>());
    assert_eq!(
        back.get(&in_last).unwrap().last_error.as_deref(),
        Some("connection refused")
    );
    assert_eq!(back.get(&in_first).unwrap().state, DeliveryState::Succeeded);
    support::delete_namespace(&client, &ns).await;
}
