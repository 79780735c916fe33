//! The write budget protects the cluster's etcd: on a control plane whose etcd has a small quota,
//! a sustained overload offering many times that quota in bytes is throttled (503 with
//! `Retry-After`), etcd never raises its NOSPACE alarm, every event answered 202 is delivered, and
//! the cluster still accepts unrelated writes afterwards.
//!
//! This binary starts its own control plane (one per test binary) with the small quota.

#[path = "../benches/loadgen.rs"]
mod loadgen;
mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use serde_json::{Value, json};
use support::operator::{INGEST_TOKEN, Operator, Options};
use support::receiver::Receiver;

const ORG: &str = "org_budget";
/// etcd's quota for this binary's control plane.
const ETCD_QUOTA: u64 = 192 << 20;
/// The operator's budget: far below what the producers offer.
const BUDGET: u64 = 256 << 10;
const ENDPOINTS: usize = 4;
const PRODUCERS: usize = 8;
const LOAD_FOR: Duration = Duration::from_secs(30);
/// Bytes of each event's `data`.
const EVENT_DATA_BYTES: usize = 48 * 1024;

/// etcd's alarms, from its gRPC gateway (`etcdctl alarm list`).
async fn etcd_alarms(http: &reqwest::Client, etcd: &str) -> Vec<Value> {
    let res = http
        .post(format!("{etcd}/v3/maintenance/alarm"))
        .json(&json!({"action": "GET"}))
        .send()
        .await
        .expect("etcd answers");
    let body: Value = res.json().await.expect("etcd answers JSON");
    body["alarms"].as_array().cloned().unwrap_or_default()
}

/// A sample of etcd's Prometheus metrics.
async fn etcd_metric(http: &reqwest::Client, etcd: &str, name: &str) -> f64 {
    let text = http
        .get(format!("{etcd}/metrics"))
        .send()
        .await
        .expect("etcd metrics")
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not in etcd's metrics"))
}

fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let trials = vec![support::harness::async_trial(
        "an_overload_is_throttled_and_never_fills_etcd",
        support::harness::Needs::OwnControlPlane,
        an_overload_is_throttled_and_never_fills_etcd,
    )];
    libtest_mimic::run(&args, trials).exit();
}

async fn an_overload_is_throttled_and_never_fills_etcd() {
    assert!(
        support::use_etcd_quota(ETCD_QUOTA),
        "the etcd quota must be set before the control plane starts"
    );
    let client = support::client().await;
    support::install_crd(&client).await;
    let etcd = support::etcd_url().expect("the harness records etcd's URL");
    let http = reqwest::Client::new();
    assert_eq!(
        etcd_metric(&http, &etcd, "etcd_server_quota_backend_bytes ").await as u64,
        ETCD_QUOTA
    );
    let ns = support::test_namespace(&client, "budget").await;
    let op = Operator::start(
        &client,
        &ns,
        Options {
            dispatcher: true,
            log_write_budget: BUDGET,
            ..Options::default()
        },
    )
    .await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    let receiver = Receiver::start(vec![]).await;
    for i in 0..ENDPOINTS {
        let (status, body, _) = op
            .call(
                "POST",
                &op.url(ORG, ""),
                Some(&key),
                Some(json!({"url": receiver.url(&format!("/ep{i}"))})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }

    // Producers that keep offering: after a 503 they wait 50 ms, whatever Retry-After.
    let accepted = Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
    let offered = Arc::new(AtomicU64::new(0));
    let throttled = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut producers = tokio::task::JoinSet::new();
    for p in 0..PRODUCERS {
        let (accepted, offered, throttled) = (accepted.clone(), offered.clone(), throttled.clone());
        let (http, url) = (
            op.http.clone(),
            format!("{}/v1/organizations/{ORG}/events", op.ingest_base),
        );
        producers.spawn(async move {
            let mut n = 0u64;
            while started.elapsed() < LOAD_FOR {
                n += 1;
                let filler = loadgen::random_text(EVENT_DATA_BYTES, (p as u64) << 32 | n);
                let body = json!({"type": "load.tick", "data": {"producer": p, "n": n, "filler": filler}});
                let res = http
                    .post(&url)
                    .bearer_auth(INGEST_TOKEN)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                // What the event would store: its payload once per endpoint.
                offered.fetch_add((EVENT_DATA_BYTES * ENDPOINTS) as u64, Ordering::Relaxed);
                match res.status().as_u16() {
                    202 => {
                        let answer: Value = res.json().await.unwrap();
                        assert_eq!(answer["deliveries"], ENDPOINTS, "{answer}");
                        accepted.lock().unwrap().insert(format!("{p}-{n}"));
                    }
                    503 => {
                        let retry_after: u64 = res
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok())
                            .expect("503 carries Retry-After in whole seconds");
                        assert!((1..=30).contains(&retry_after), "Retry-After {retry_after}");
                        throttled.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    other => panic!("ingest answered {other}: {}", res.text().await.unwrap_or_default()),
                }
            }
        });
    }
    while let Some(done) = producers.join_next().await {
        done.expect("producer ran to the end");
    }
    let load_secs = started.elapsed().as_secs_f64();
    let accepted = accepted.lock().unwrap().clone();
    let offered = offered.load(Ordering::Relaxed);
    let throttled = throttled.load(Ordering::Relaxed);
    eprintln!(
        "offered {} MiB in {load_secs:.0} s; {} events accepted, {throttled} answered 503",
        offered >> 20,
        accepted.len()
    );
    assert!(
        offered > 2 * ETCD_QUOTA,
        "the load must offer well past etcd's quota ({offered} bytes)"
    );
    assert!(throttled > 0, "the budget never throttled");
    assert!(!accepted.is_empty(), "nothing was accepted");

    // Every event answered 202 reaches every endpoint.
    support::wait_for("every accepted event delivered", Duration::from_secs(120), || async {
        let mut seen: HashMap<String, HashSet<String>> = HashMap::new();
        for r in receiver.received() {
            let body = r.json();
            let data = &body["data"];
            let event = format!("{}-{}", data["producer"], data["n"]);
            seen.entry(event)
                .or_default()
                .insert(r.header("webhook-id").to_string());
        }
        let missing = accepted
            .iter()
            .filter(|event| seen.get(*event).map_or(0, HashSet::len) < ENDPOINTS)
            .count();
        (missing == 0).then_some(())
    })
    .await;

    let alarms = etcd_alarms(&http, &etcd).await;
    assert!(alarms.is_empty(), "etcd raised alarms: {alarms:?}");
    let db = etcd_metric(&http, &etcd, "etcd_mvcc_db_total_size_in_bytes ").await;
    let metrics = op.metrics.encode();
    let written = metric(
        &metrics,
        "capy_webhooks_apiserver_write_bytes_total{kind=\"configmap\"} ",
    ) + metric(
        &metrics,
        "capy_webhooks_apiserver_write_bytes_total{kind=\"endpoint_status\"} ",
    );
    eprintln!(
        "etcd database {:.1} MiB of a {} MiB quota; the dispatcher wrote {:.1} MiB",
        db / 1048576.0,
        ETCD_QUOTA >> 20,
        written / 1048576.0
    );
    assert!(metric(&metrics, "capy_webhooks_ingest_throttled_total ") > 0.0);
    assert_eq!(metric(&metrics, "capy_webhooks_log_write_budget_bytes "), BUDGET as f64);
    // The budget held: what was written is the rate over the run plus the saved-up burst, plus
    // what was admitted in the last instant before the bucket ran dry (generously).
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = BUDGET as f64 * (elapsed + 10.0) + 16.0 * 1048576.0;
    assert!(
        written <= allowed,
        "wrote {written} bytes, budget allowed about {allowed}"
    );

    // The cluster still takes writes of unrelated objects.
    let other = support::test_namespace(&client, "budget-other").await;
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("unrelated".into()),
            ..Default::default()
        },
        data: Some([("blob".to_string(), "y".repeat(256 * 1024))].into()),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), &other)
        .create(&PostParams::default(), &cm)
        .await
        .expect("the cluster still accepts writes");
    op.stop().await;
}
