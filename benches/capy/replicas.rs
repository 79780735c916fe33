//! Several replicas (README, "Several replicas"): dispatch with three replicas beside one, the
//! failover after `kill -9` of a shard's owner, and a rolling restart under load. Every replica
//! is the release binary in its own process, in a namespace of its own.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kube::Client;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::{ControlPlane, INGEST_TOKEN, Operator, Receiver, ms, payload, percentile};

const NS: &str = "bench-replicas";

/// A replica: its process and name.
struct Replica {
    name: String,
    op: Operator,
}

fn start(cp: &ControlPlane, workdir: &Path, name: &str, lease: &str) -> Replica {
    let op = Operator::start_in(
        NS,
        name,
        &cp.kubeconfig,
        workdir,
        "10s",
        &["--log-write-budget", "0", "--identity", name, "--lease-duration", lease],
        // Handovers are logged at info: the logs stay in the work directory for a look.
        "info",
    );
    Replica {
        name: name.to_string(),
        op,
    }
}

/// The shards a replica holds, from its `/readyz`.
async fn shards(http: &reqwest::Client, r: &Replica) -> Option<Vec<u32>> {
    let body: Value = http
        .get(format!("{}/readyz", r.op.metrics))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    serde_json::from_value(body.get("shards")?.clone()).ok()
}

/// Waits until the replicas hold all 16 shards between them, each a fair share.
async fn balanced(http: &reqwest::Client, replicas: &[Replica]) -> BTreeMap<String, Vec<u32>> {
    let fair = 16usize.div_ceil(replicas.len());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut held = BTreeMap::new();
        for r in replicas {
            if let Some(s) = shards(http, r).await {
                held.insert(r.name.clone(), s);
            }
        }
        let total: usize = held.values().map(Vec::len).sum();
        if held.len() == replicas.len() && total == 16 && held.values().all(|s| !s.is_empty() && s.len() <= fair) {
            return held;
        }
        assert!(Instant::now() < deadline, "the shards never balanced: {held:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// API keys and `per_org` endpoints in each organization, through the first replica.
async fn endpoints(client: &Client, http: &reqwest::Client, op: &Operator, orgs: &[String], per_org: usize, url: &str) {
    for org in orgs {
        let (_, key) = capy_webhooks::auth::api_keys::create_key(client, NS, org, None, Some("bench"))
            .await
            .unwrap();
        let list = format!("{}/v1/organizations/{org}/webhook-endpoints", op.api);
        loop {
            let r = http.get(&list).bearer_auth(&key).send().await;
            if matches!(&r, Ok(r) if r.status() == 200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for _ in 0..per_org {
            let r = http
                .post(&list)
                .bearer_auth(&key)
                .json(&json!({"url": url}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
    }
}

/// The ingest URLs of the running replicas, as they change (a rollout replaces them).
type Ingests = Arc<std::sync::Mutex<Vec<String>>>;

/// Posts one event until a replica answers 202 (another replica when one does not answer,
/// after `Retry-After` on 503, or every `poll` when given); returns (latency of the 202 request,
/// 503s seen). Each try picks from the replicas running at that moment.
async fn post_event(
    http: &reqwest::Client,
    ingests: &Ingests,
    org: &str,
    seq: u64,
    poll: Option<Duration>,
) -> (Duration, u64) {
    let mut unavailable = 0;
    let mut attempt = seq as usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "event {seq} was not accepted within 120 s");
        let url = {
            let urls = ingests.lock().unwrap();
            urls[attempt % urls.len()].clone()
        };
        attempt += 1;
        let t = Instant::now();
        let res = http
            .post(format!("{url}/v1/organizations/{org}/events"))
            .bearer_auth(INGEST_TOKEN)
            .json(&json!({"type": "bench.event", "data": payload(seq)}))
            .timeout(Duration::from_secs(30))
            .send()
            .await;
        match res {
            Ok(r) if r.status() == 202 => return (t.elapsed(), unavailable),
            Ok(r) if r.status() == 503 => {
                unavailable += 1;
                let wait = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(1u64);
                tokio::time::sleep(poll.unwrap_or(Duration::from_secs(wait))).await;
            }
            Ok(r) => panic!("ingest answered {}", r.status()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Sends `events` events over `orgs` through every replica's ingest port, 64 in flight; returns
/// deliveries/s until the receiver got them all.
async fn burst(
    http: &reqwest::Client,
    ingests: &[String],
    orgs: &[String],
    rx: &Receiver,
    first_seq: u64,
    events: u64,
    per_event: u64,
) -> f64 {
    let expected = rx.count.load(Ordering::Relaxed) + events * per_event;
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let ingests: Ingests = Arc::new(std::sync::Mutex::new(ingests.to_vec()));
    let workers: Vec<_> = (0..super::CONCURRENCY)
        .map(|_| {
            let (http, next, ingests, orgs) = (http.clone(), next.clone(), ingests.clone(), orgs.to_vec());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= events {
                        break;
                    }
                    let org = &orgs[(n % orgs.len() as u64) as usize];
                    post_event(&http, &ingests, org, first_seq + n, None).await;
                }
            })
        })
        .collect();
    futures::future::join_all(workers).await;
    rx.wait_count(expected).await;
    (events * per_event) as f64 / t0.elapsed().as_secs_f64()
}

fn ingests(replicas: &[Replica]) -> Vec<String> {
    replicas.iter().map(|r| r.op.ingest.clone()).collect()
}

/// Runs the replica scenarios and adds their rows.
pub(super) async fn run(
    cp: &ControlPlane,
    client: &Client,
    http: &reqwest::Client,
    rx: &Receiver,
    _workdir: &Path,
    quick: bool,
    row: &impl Fn(&str, String, String, &str),
) {
    // The replicas' logs are kept after the run, for a look at the handovers.
    let logs = std::env::temp_dir().join("capy-bench-replicas");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).unwrap();
    eprintln!("[bench] replica logs in {}", logs.display());
    let workdir = logs.as_path();
    super::create_namespace(client, NS).await;
    let url = format!("{}/deliver", rx.addr);
    // Dispatch: 10 organizations with 10 endpoints each, the same burst through one replica, then
    // spread over three.
    let orgs: Vec<String> = (0..10).map(|i| format!("org_rep_{i}")).collect();
    let events = if quick { 400 } else { 3000 };
    let mut one = vec![start(cp, workdir, "solo", "15s")];
    one[0].op.wait_ready(http).await;
    balanced(http, &one).await;
    endpoints(client, http, &one[0].op, &orgs, 10, &url).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let single = burst(http, &ingests(&one), &orgs, rx, 40_000_000, events, 10).await;
    eprintln!("[bench] replicas: 1 replica {single:.0}/s");
    one[0].op.stop();
    drop(one);
    let mut three: Vec<Replica> = ["r1", "r2", "r3"]
        .iter()
        .map(|n| start(cp, workdir, n, if quick { "6s" } else { "15s" }))
        .collect();
    for r in &three {
        r.op.wait_ready(http).await;
    }
    balanced(http, &three).await;
    let spread = burst(http, &ingests(&three), &orgs, rx, 41_000_000, events, 10).await;
    row(
        &format!(
            "Dispatch, 3 replicas on this machine, 10 organizations × 10 endpoints ({} deliveries, events sent to every replica)",
            events * 10
        ),
        format!("{spread:.0} deliveries/s"),
        format!("1 replica, same scenario: {single:.0}/s (ratio {:.2})", spread / single),
        "-",
    );
    eprintln!("[bench] replicas: 3 replicas {spread:.0}/s");

    // Failover: kill -9 the owner of an organization's shard, send an event for it at once
    // through another replica (retried every 100 ms), time its first delivery. The killed
    // replica comes back under a new name before the next round.
    let lease = if quick { 6 } else { 15 };
    let kills = 5;
    let mut took = Vec::new();
    let mut seq = 42_000_000u64;
    for round in 0..kills {
        let held = balanced(http, &three).await;
        let org = &orgs[round % orgs.len()];
        let shard = capy_webhooks::shards::shard_of(org);
        let owner = held.iter().find(|(_, s)| s.contains(&shard)).unwrap().0.clone();
        let index = three.iter().position(|r| r.name == owner).unwrap();
        let victim = three.remove(index);
        drop(victim); // SIGKILL
        let killed = Instant::now();
        seq += 1;
        let survivors: Ingests = Arc::new(std::sync::Mutex::new(ingests(&three)));
        post_event(http, &survivors, org, seq, Some(Duration::from_millis(100))).await;
        let deadline = Instant::now() + Duration::from_secs(120);
        let arrived = loop {
            if let Some(at) = rx.arrivals.lock().await.get(&seq) {
                break *at;
            }
            assert!(Instant::now() < deadline, "the event after the kill never arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        took.push(ms(arrived.duration_since(killed)));
        let name = format!("{owner}x");
        let back = start(cp, workdir, &name, &format!("{lease}s"));
        back.op.wait_ready(http).await;
        three.push(back);
        eprintln!("[bench] replicas: failover {round}: {:.0} ms", took[took.len() - 1]);
    }
    took.sort_by(|a, b| a.partial_cmp(b).unwrap());
    row(
        &format!(
            "Failover: kill -9 of a shard's owner → first delivery of an event sent just after ({kills} kills, --lease-duration {lease}s)"
        ),
        format!(
            "p50 {:.1} s, max {:.1} s",
            percentile(&took, 0.5) / 1000.0,
            took[took.len() - 1] / 1000.0
        ),
        "-".into(),
        &format!("≤ {} s (Lease duration + 5 s)", lease + 5),
    );

    // Rolling restart under 500 events/s into 10 organizations with one endpoint each: each
    // replica in turn is replaced, the new pod first, then SIGTERM to the old one (as a rollout
    // with maxUnavailable 0 does); producers honour Retry-After.
    let orgs: Vec<String> = (0..10).map(|i| format!("org_roll_{i}")).collect();
    endpoints(client, http, &three[0].op, &orgs, 1, &url).await;
    balanced(http, &three).await;
    let rate = 500u64;
    let ingest_urls = Arc::new(std::sync::Mutex::new(ingests(&three)));
    let results: Arc<Mutex<Vec<(u64, Duration, u64)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let first = 43_000_000u64;
    let producer = {
        let (http, urls, results, stop, orgs) = (
            http.clone(),
            ingest_urls.clone(),
            results.clone(),
            stop.clone(),
            orgs.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate as u32);
            let mut sent = tokio::task::JoinSet::new();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                let (http, results) = (http.clone(), results.clone());
                let urls = urls.clone();
                let org = orgs[(n % orgs.len() as u64) as usize].clone();
                let seq = first + n;
                sent.spawn(async move {
                    let (latency, unavailable) = post_event(&http, &urls, &org, seq, None).await;
                    results.lock().await.push((seq, latency, unavailable));
                });
                n += 1;
            }
            while sent.join_next().await.is_some() {}
        })
    };
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..three.len() {
        let name = format!("{}-next", three[i].name);
        let next = start(cp, workdir, &name, &format!("{lease}s"));
        next.op.wait_ready(http).await;
        let mut old = std::mem::replace(&mut three[i], next);
        *ingest_urls.lock().unwrap() = ingests(&three);
        old.op.stop();
        balanced(http, &three).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    producer.await.unwrap();
    let elapsed = t0.elapsed();
    let results = results.lock().await.clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    let lost = loop {
        let arrivals = rx.arrivals.lock().await;
        let lost = results.iter().filter(|(s, _, _)| !arrivals.contains_key(s)).count();
        drop(arrivals);
        if lost == 0 || Instant::now() > deadline {
            break lost;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut latency: Vec<f64> = results.iter().map(|(_, l, _)| ms(*l)).collect();
    latency.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let unavailable: u64 = results.iter().map(|(_, _, u)| u).sum();
    row(
        &format!(
            "Rolling restart of 3 replicas under {rate} events/s ({} events over {:.0} s, one endpoint each)",
            results.len(),
            elapsed.as_secs_f64()
        ),
        format!(
            "{unavailable} answers 503; ingest p50 {:.1} ms, p99 {:.1} ms (202 answers); {lost} lost",
            percentile(&latency, 0.5),
            percentile(&latency, 0.99)
        ),
        "-".into(),
        "0 lost",
    );
    for r in &mut three {
        r.op.stop();
    }
}
