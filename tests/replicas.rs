//! Several replicas on one control plane (design.md section 7): the real binary, three
//! processes, shards held through Leases, work forwarded between replicas, `kill -9`, SIGTERM
//! hand-overs and scaling. Every event answered 202 must arrive, signed, at a real receiver.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capy_webhooks::shards::{SHARD_COUNT, shard_of};
use serde_json::{Value, json};
use support::operator::INGEST_TOKEN;
use support::process::OperatorProcess;
use support::receiver::{Received, Receiver};

/// One scenario at a time: each runs three operator processes.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The Lease duration of every replica in these tests.
const LEASE_SECS: u64 = 6;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One replica: its name (identity), ports and process.
struct Replica {
    name: String,
    api: u16,
    ingest: u16,
    ops: u16,
    process: Option<OperatorProcess>,
}

impl Replica {
    fn start(ns: &str, dir: &Path, name: &str) -> Self {
        let (api, ingest, ops) = (free_port(), free_port(), free_port());
        let mut replica = Self {
            name: name.to_string(),
            api,
            ingest,
            ops,
            process: None,
        };
        replica.restart(ns, dir);
        replica
    }

    /// Starts the process again on the same ports and identity.
    fn restart(&mut self, ns: &str, dir: &Path) {
        let flags = vec![
            ("--api-listen", format!("127.0.0.1:{}", self.api)),
            ("--ingest-listen", format!("127.0.0.1:{}", self.ingest)),
            ("--metrics-listen", format!("127.0.0.1:{}", self.ops)),
            ("--identity", self.name.clone()),
            ("--lease-duration", format!("{LEASE_SECS}s")),
            ("--retry-schedule", "0s,1s,1s,2s,2s,2s".into()),
            ("--shutdown-grace", "5s".into()),
            ("--log-write-budget", "0".into()),
            ("--controller-wait", "30s".into()),
        ];
        self.process = Some(OperatorProcess::start_replica(ns, dir, &self.name, flags));
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// SIGTERM, and wait until it exited. Waits without blocking the runtime: the receiver and
    /// the producers run on it, and a replica draining its attempts waits for the receiver.
    async fn terminate(&mut self) {
        if let Some(mut p) = self.process.take() {
            let pid = p.child.id().to_string();
            assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
            let deadline = Instant::now() + Duration::from_secs(40);
            while Instant::now() < deadline {
                if p.child.try_wait().unwrap().is_some() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("replica {} did not exit within 40 s of SIGTERM", self.name);
        }
    }

    fn running(&self) -> bool {
        self.process.is_some()
    }
}

/// The shards a replica says it holds (`/readyz`), `None` when it does not answer.
async fn shards_of(http: &reqwest::Client, replica: &Replica) -> Option<Vec<u32>> {
    let r = http
        .get(format!("http://127.0.0.1:{}/readyz", replica.ops))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let body: Value = r.json().await.ok()?;
    serde_json::from_value(body.get("shards")?.clone()).ok()
}

/// Waits until the running replicas hold every shard between them, each its fair share at most
/// (rounded up), none twice; returns who holds what.
async fn wait_balanced(http: &reqwest::Client, replicas: &[Replica], within: Duration) -> BTreeMap<String, Vec<u32>> {
    let running: Vec<&Replica> = replicas.iter().filter(|r| r.running()).collect();
    let fair = (SHARD_COUNT as usize).div_ceil(running.len());
    support::wait_for("every shard held once, fairly", within, || async {
        let mut held = BTreeMap::new();
        for r in &running {
            held.insert(r.name.clone(), shards_of(http, r).await?);
        }
        let all: Vec<u32> = held.values().flatten().copied().collect();
        let distinct: HashSet<u32> = all.iter().copied().collect();
        let fair_ok = held.values().all(|s| !s.is_empty() && s.len() <= fair);
        (all.len() == SHARD_COUNT as usize && distinct.len() == all.len() && fair_ok).then_some(held)
    })
    .await
}

/// One endpoint on the receiver: its organization, id and secret.
#[derive(Clone)]
struct Target {
    org: String,
    secret: String,
}

/// Creates `per_org` endpoints in each organization through random replicas' REST ports;
/// returns them by receiver path, and an API key per organization.
async fn create_endpoints(
    client: &kube::Client,
    ns: &str,
    http: &reqwest::Client,
    replicas: &[Replica],
    receiver: &Receiver,
    orgs: &[String],
    per_org: usize,
) -> (HashMap<String, Target>, HashMap<String, String>) {
    let mut targets = HashMap::new();
    let mut keys = HashMap::new();
    for (i, org) in orgs.iter().enumerate() {
        let (_, key) = capy_webhooks::auth::api_keys::create_key(client, ns, org, None, None)
            .await
            .unwrap();
        keys.insert(org.clone(), key.clone());
        for n in 0..per_org {
            let path = format!("/{org}/{n}");
            let replica = &replicas[(i + n) % replicas.len()];
            let url = format!(
                "http://127.0.0.1:{}/v1/organizations/{org}/webhook-endpoints",
                replica.api
            );
            let created: Value = support::wait_for("endpoint created", Duration::from_secs(60), || async {
                let r = http
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&json!({"url": receiver.url(&path)}))
                    .send()
                    .await
                    .ok()?;
                (r.status() == 201).then_some(())?;
                r.json().await.ok()
            })
            .await;
            let secret = created["plaintext_secret"].as_str().unwrap().to_string();
            targets.insert(
                path,
                Target {
                    org: org.clone(),
                    secret,
                },
            );
        }
    }
    (targets, keys)
}

/// What a producer saw: the events answered 202 (organization, seq), and how many 503s.
#[derive(Default)]
struct Produced {
    accepted: Vec<(String, u64)>,
    unavailable: usize,
    other: Vec<String>,
}

/// Posts one event to a random running replica, retrying 503s (after `Retry-After`) and
/// replicas that do not answer, until one answers 202 (or 60 s passed).
async fn produce_one(
    http: &reqwest::Client,
    ports: &Arc<Mutex<Vec<u16>>>,
    org: &str,
    seq: u64,
    produced: &Arc<Mutex<Produced>>,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let port = {
            let ports = ports.lock().unwrap();
            ports[rand::random_range(0..ports.len())]
        };
        let res = http
            .post(format!("http://127.0.0.1:{port}/v1/organizations/{org}/events"))
            .bearer_auth(INGEST_TOKEN)
            .header("idempotency-key", format!("{org}-{seq}"))
            .json(&json!({"type": "order.created", "data": {"seq": seq}}))
            .timeout(Duration::from_secs(30))
            .send()
            .await;
        match res {
            Ok(r) if r.status() == 202 => {
                produced.lock().unwrap().accepted.push((org.to_string(), seq));
                return;
            }
            Ok(r) if r.status() == 503 => {
                produced.lock().unwrap().unavailable += 1;
                let wait: u64 = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .expect("a 503 says when to retry");
                assert!((1..=5).contains(&wait), "Retry-After {wait} s");
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                produced.lock().unwrap().other.push(format!("{status}: {body}"));
                return;
            }
            // The replica is gone (killed, restarting): another one takes it.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    produced
        .lock()
        .unwrap()
        .other
        .push(format!("event {org}/{seq} never accepted within 60 s"));
}

/// The (endpoint path, seq) pairs the receiver got, checking every signature; and how many
/// requests carried a delivery id seen before (redeliveries).
fn received_deliveries(received: &[Received], targets: &HashMap<String, Target>) -> (HashSet<(String, u64)>, usize) {
    let mut got = HashSet::new();
    let mut ids = HashSet::new();
    let mut duplicates = 0;
    for r in received {
        let target = targets
            .get(&r.path)
            .unwrap_or_else(|| panic!("a delivery to an unknown path {}", r.path));
        let wh = standardwebhooks::Webhook::new(&target.secret).unwrap();
        wh.verify(&r.body, &r.headers)
            .unwrap_or_else(|e| panic!("signature of a delivery to {} does not verify: {e}", r.path));
        let body = r.json();
        if body["type"] != "order.created" {
            continue;
        }
        if !ids.insert(r.header("webhook-id").to_string()) {
            duplicates += 1;
        }
        got.insert((r.path.clone(), body["data"]["seq"].as_u64().unwrap()));
    }
    (got, duplicates)
}

/// Every (endpoint path, seq) an accepted event must reach.
fn expected(accepted: &[(String, u64)], targets: &HashMap<String, Target>) -> HashSet<(String, u64)> {
    accepted
        .iter()
        .flat_map(|(org, seq)| {
            targets
                .iter()
                .filter(move |(_, t)| t.org == *org)
                .map(move |(path, _)| (path.clone(), *seq))
        })
        .collect()
}

/// Waits until every accepted event reached every endpoint of its organization.
async fn wait_delivered(
    receiver: &Receiver,
    targets: &HashMap<String, Target>,
    accepted: &[(String, u64)],
    within: Duration,
) -> usize {
    let want = expected(accepted, targets);
    let started = Instant::now();
    loop {
        let (got, duplicates) = received_deliveries(&receiver.received(), targets);
        let missing: Vec<_> = want.difference(&got).take(5).collect();
        if missing.is_empty() {
            return duplicates;
        }
        assert!(
            started.elapsed() < within,
            "{} of {} deliveries never arrived, e.g. {missing:?}",
            want.difference(&got).count(),
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn orgs(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("org_rep{i}")).collect()
}

/// The log lines of every replica that report a second writer (there must be none).
fn second_writers(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            found.extend(text.lines().filter(|l| l.contains("second writer")).map(str::to_string));
        }
    }
    found
}

/// Where the replicas' logs go: kept (and printed) when the test fails.
fn logs_dir() -> tempfile::TempDir {
    let mut dir = tempfile::Builder::new().prefix("capy-replicas-").tempdir().unwrap();
    // Removed only by a test that passes (see the end of each test).
    dir.disable_cleanup(true);
    println!("replica logs in {}", dir.path().display());
    dir
}

/// What every scenario starts with: a namespace, replicas with the given names, balanced, a
/// receiver, and two endpoints in each of ten organizations on it.
struct Scenario {
    client: kube::Client,
    ns: String,
    dir: tempfile::TempDir,
    http: reqwest::Client,
    replicas: Vec<Replica>,
    held: BTreeMap<String, Vec<u32>>,
    receiver: Receiver,
    orgs: Vec<String>,
    targets: HashMap<String, Target>,
}

impl Scenario {
    async fn start(prefix: &str, names: &[&str]) -> Self {
        let client = support::client().await;
        support::install_crd(&client).await;
        let ns = support::test_namespace(&client, prefix).await;
        let dir = logs_dir();
        let http = reqwest::Client::new();
        let replicas: Vec<Replica> = names.iter().map(|n| Replica::start(&ns, dir.path(), n)).collect();
        let held = wait_balanced(&http, &replicas, Duration::from_secs(60)).await;
        println!("shards held: {held:?}");
        let receiver = Receiver::start(Vec::new()).await;
        let orgs = orgs(10);
        let (targets, _keys) = create_endpoints(&client, &ns, &http, &replicas, &receiver, &orgs, 2).await;
        Self {
            client,
            ns,
            dir,
            http,
            replicas,
            held,
            receiver,
            orgs,
            targets,
        }
    }

    /// The ingest ports of the running replicas, for producers.
    fn ingest_ports(&self) -> Arc<Mutex<Vec<u16>>> {
        Arc::new(Mutex::new(
            self.replicas.iter().filter(|r| r.running()).map(|r| r.ingest).collect(),
        ))
    }

    /// Checks that no log had two writers, then cleans up (the logs stay when a check failed).
    async fn finish(mut self) {
        let found = second_writers(self.dir.path());
        assert!(found.is_empty(), "{found:?}");
        support::delete_namespace(&self.client, &self.ns).await;
        self.dir.disable_cleanup(false);
    }
}

/// Proof 1: three replicas, 20 endpoints in 10 organizations, 2,000 events to random replicas'
/// ingest ports, and `kill -9` of a replica that owns some of those organizations mid-stream.
#[tokio::test]
async fn three_replicas_lose_nothing_when_one_is_killed() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut sc = Scenario::start("replicas", &["a", "b", "c"]).await;
    // The victim: the replica owning the most of these organizations.
    let owner = |org: &str| {
        sc.held
            .iter()
            .find(|(_, shards)| shards.contains(&shard_of(org)))
            .map(|(name, _)| name.clone())
            .unwrap()
    };
    let victim = ["a", "b", "c"]
        .into_iter()
        .max_by_key(|name| sc.orgs.iter().filter(|o| owner(o) == *name).count())
        .unwrap()
        .to_string();
    let victim_orgs: Vec<String> = sc.orgs.iter().filter(|o| owner(o) == victim).cloned().collect();
    assert!(!victim_orgs.is_empty());

    const EVENTS: u64 = 2000;
    let ports = sc.ingest_ports();
    let produced = Arc::new(Mutex::new(Produced::default()));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let producers: Vec<_> = (0..8)
        .map(|_| {
            let (http, ports, produced, next, orgs) = (
                sc.http.clone(),
                ports.clone(),
                produced.clone(),
                next.clone(),
                sc.orgs.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let seq = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if seq >= EVENTS {
                        break;
                    }
                    let org = &orgs[(seq % orgs.len() as u64) as usize];
                    produce_one(&http, &ports, org, seq, &produced).await;
                }
            })
        })
        .collect();
    support::wait_for("a third of the events sent", Duration::from_secs(120), || async {
        (next.load(std::sync::atomic::Ordering::SeqCst) >= EVENTS / 3).then_some(())
    })
    .await;
    let index = sc.replicas.iter().position(|r| r.name == victim).unwrap();
    ports.lock().unwrap().retain(|p| *p != sc.replicas[index].ingest);
    sc.replicas[index].kill();
    let killed_at = Instant::now();
    // Deliveries of the victim's organizations resume: an event sent just after the kill arrives.
    let probe_seq = 1_000_000;
    let probe_org = victim_orgs[0].clone();
    {
        let (http, ports, produced) = (sc.http.clone(), ports.clone(), produced.clone());
        let org = probe_org.clone();
        tokio::spawn(async move { produce_one(&http, &ports, &org, probe_seq, &produced).await });
    }
    let receiver = sc.receiver.clone();
    let resumed = support::wait_for(
        "the victim's organizations delivered again",
        Duration::from_secs(60),
        || async {
            receiver
                .received()
                .iter()
                .any(|r| r.path.starts_with(&format!("/{probe_org}/")) && r.json()["data"]["seq"] == probe_seq)
                .then(|| killed_at.elapsed())
        },
    )
    .await;
    println!("deliveries of the killed replica's shards resumed {resumed:?} after kill -9");
    assert!(
        resumed <= Duration::from_secs(LEASE_SECS + 5),
        "resumed after {resumed:?}, more than the Lease duration + 5 s"
    );
    for p in producers {
        p.await.unwrap();
    }
    let produced = std::mem::take(&mut *produced.lock().unwrap());
    assert!(
        produced.other.is_empty(),
        "answers other than 202 and 503: {:?}",
        produced.other
    );
    assert_eq!(produced.accepted.len() as u64, EVENTS + 1);
    let duplicates = wait_delivered(&sc.receiver, &sc.targets, &produced.accepted, Duration::from_secs(120)).await;
    // Redelivered: at most what the killed replica had in flight (8 per endpoint it owned).
    let victim_endpoints = sc.targets.values().filter(|t| victim_orgs.contains(&t.org)).count();
    println!(
        "{} events accepted, {} answers 503, {} deliveries, {duplicates} redelivered; the killed replica owned {victim_endpoints} endpoints",
        produced.accepted.len(),
        produced.unavailable,
        expected(&produced.accepted, &sc.targets).len()
    );
    assert!(duplicates <= 8 * victim_endpoints, "{duplicates} redeliveries");
    // The survivors took the victim's shards between them.
    let survivors = wait_balanced(&sc.http, &sc.replicas, Duration::from_secs(30)).await;
    assert_eq!(survivors.len(), 2);
    // A replica that starts now, while another leaves, takes its whole share at once: the dead
    // replica's membership, never released, does not count (its renewals stopped long ago),
    // although the newcomer has not watched that Lease for a whole duration yet (a rollout after
    // a crash: otherwise the leaver's shards would wait, unowned, that long).
    let joined = Instant::now();
    sc.replicas.push(Replica::start(&sc.ns, sc.dir.path(), "d"));
    support::wait_for("the newcomer holds shards", Duration::from_secs(30), || async {
        let d = sc.replicas.last().unwrap();
        shards_of(&sc.http, d).await.filter(|s| !s.is_empty())
    })
    .await;
    let leaver = sc.replicas.iter().position(|r| r.running() && r.name != "d").unwrap();
    sc.replicas[leaver].terminate().await;
    let held = wait_balanced(&sc.http, &sc.replicas, Duration::from_secs(30)).await;
    println!(
        "the newcomer had its share {:?} after it started: {held:?}",
        joined.elapsed()
    );
    assert!(
        joined.elapsed() < Duration::from_secs(LEASE_SECS),
        "the newcomer waited {:?} for its share",
        joined.elapsed()
    );
    sc.finish().await;
}

/// Sends `rate` events per second over `orgs` to random running replicas until `stop` is set,
/// then waits for every event's answer.
fn spawn_producer(
    http: &reqwest::Client,
    ports: &Arc<Mutex<Vec<u16>>>,
    orgs: &[String],
    rate: u32,
    stop: &Arc<std::sync::atomic::AtomicBool>,
    produced: &Arc<Mutex<Produced>>,
) -> tokio::task::JoinHandle<()> {
    let (http, ports, orgs, stop, produced) = (
        http.clone(),
        ports.clone(),
        orgs.to_vec(),
        stop.clone(),
        produced.clone(),
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent = tokio::task::JoinSet::new();
        let mut seq = 0u64;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            tick.tick().await;
            let org = orgs[(seq % orgs.len() as u64) as usize].clone();
            let (http, ports, produced) = (http.clone(), ports.clone(), produced.clone());
            sent.spawn(async move { produce_one(&http, &ports, &org, seq, &produced).await });
            seq += 1;
        }
        while sent.join_next().await.is_some() {}
    })
}

/// Proof 2: a rolling restart under a steady stream of events. Each of three replicas in turn
/// gets SIGTERM (it hands its shards over and exits) and is started again, as a new pod with a
/// new name would be; producers see only 202 and 503 (retried after `Retry-After`), and every
/// accepted event is delivered.
#[tokio::test]
async fn a_rolling_restart_loses_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut sc = Scenario::start("rolling", &["a", "b", "c"]).await;
    let ports = sc.ingest_ports();
    let produced = Arc::new(Mutex::new(Produced::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let producer = spawn_producer(&sc.http, &ports, &sc.orgs, 100, &stop, &produced);
    tokio::time::sleep(Duration::from_secs(5)).await;
    for i in 0..sc.replicas.len() {
        let replica = &mut sc.replicas[i];
        let term_at = Instant::now();
        replica.terminate().await;
        let exited_after = term_at.elapsed();
        // Attempts to a receiver that answers finish in milliseconds: a replica that waits out
        // its whole shutdown grace (5 s here) left work behind that did not drain.
        assert!(
            exited_after < Duration::from_secs(4),
            "replica {i} took {exited_after:?} to exit after SIGTERM"
        );
        replica.name = format!("{}-2", replica.name);
        replica.restart(&sc.ns, sc.dir.path());
        let held = wait_balanced(&sc.http, &sc.replicas, Duration::from_secs(60)).await;
        println!(
            "replica {i} exited {exited_after:?} after SIGTERM, restarted as {}; shards balanced {:?} after SIGTERM: {held:?}",
            sc.replicas[i].name,
            term_at.elapsed()
        );
    }
    let restarts_took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(started.elapsed())).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    producer.await.unwrap();
    let produced = std::mem::take(&mut *produced.lock().unwrap());
    println!(
        "rolling restart: {} events accepted over {:?}, {} answers 503 (retried), restarts done after {restarts_took:?}",
        produced.accepted.len(),
        started.elapsed(),
        produced.unavailable
    );
    assert!(
        produced.other.is_empty(),
        "answers other than 202 and 503: {:?}",
        produced.other
    );
    // The producer paces itself at 100 events/s and falls behind on a busy machine (CI ran 4,944
    // in the minute once): what matters is that the stream went on through every restart and
    // that none of it is lost, not the machine's speed.
    assert!(produced.accepted.len() >= 2500, "{} events", produced.accepted.len());
    wait_delivered(&sc.receiver, &sc.targets, &produced.accepted, Duration::from_secs(120)).await;
    sc.finish().await;
}

/// Proof 4: scale 1 → 3 → 1 under a stream of events. The shards spread to the new replicas and
/// come back when they leave; nothing is lost and no log ever has two writers.
#[tokio::test]
async fn scaling_out_and_back_in_moves_the_shards_and_loses_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut sc = Scenario::start("scale", &["a"]).await;
    assert_eq!(
        sc.held["a"].len(),
        SHARD_COUNT as usize,
        "one replica holds every shard"
    );
    let ports = sc.ingest_ports();
    let produced = Arc::new(Mutex::new(Produced::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = spawn_producer(&sc.http, &ports, &sc.orgs, 50, &stop, &produced);

    for name in ["b", "c"] {
        sc.replicas.push(Replica::start(&sc.ns, sc.dir.path(), name));
    }
    *ports.lock().unwrap() = sc.replicas.iter().map(|r| r.ingest).collect();
    let spread = wait_balanced(&sc.http, &sc.replicas, Duration::from_secs(60)).await;
    println!("scaled to 3: {spread:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    *ports.lock().unwrap() = vec![sc.replicas[0].ingest];
    for replica in &mut sc.replicas[1..] {
        replica.terminate().await;
    }
    let back = wait_balanced(&sc.http, &sc.replicas, Duration::from_secs(30)).await;
    assert_eq!(
        back["a"].len(),
        SHARD_COUNT as usize,
        "back to one replica holding every shard"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    producer.await.unwrap();
    let produced = std::mem::take(&mut *produced.lock().unwrap());
    println!(
        "scale 1 → 3 → 1: {} events accepted, {} answers 503",
        produced.accepted.len(),
        produced.unavailable
    );
    assert!(
        produced.other.is_empty(),
        "answers other than 202 and 503: {:?}",
        produced.other
    );
    wait_delivered(&sc.receiver, &sc.targets, &produced.accepted, Duration::from_secs(60)).await;
    sc.finish().await;
}

/// Fencing: a replica frozen (SIGSTOP, as a long GC pause or a partition would) cannot renew
/// its shard Leases; the others take its shards once they expire and deliver its organizations'
/// events. When it wakes, it finds its fences closed and stops that work without writing, then
/// rejoins and gets a fair share again. Nothing accepted is lost.
///
/// "Without writing" is checked on the API server: once everything accepted is delivered and
/// the logs of the frozen replica's shards have settled, nobody has work for them, so any change
/// to those ConfigMaps between waking the replica and its rejoining would be a write of the
/// frozen replica's stale work after its fences closed.
#[tokio::test]
async fn a_frozen_replica_stops_writing_before_its_shards_move() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let sc = Scenario::start("fencing", &["a", "b", "c"]).await;
    // The replica whose shards hold the most of the scenario's organizations: the check below
    // needs logs in the frozen shards, and which shards a replica holds is up to the balancing.
    let frozen_name = sc
        .held
        .iter()
        .max_by_key(|(_, shards)| sc.orgs.iter().filter(|o| shards.contains(&shard_of(o))).count())
        .map(|(name, _)| name.clone())
        .unwrap();
    let frozen = sc.replicas.iter().position(|r| r.name == frozen_name).unwrap();
    let frozen_shards = sc.held[&frozen_name].clone();
    let ports = Arc::new(Mutex::new(
        sc.replicas
            .iter()
            .filter(|r| r.name != frozen_name)
            .map(|r| r.ingest)
            .collect::<Vec<_>>(),
    ));
    let produced = Arc::new(Mutex::new(Produced::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = spawn_producer(&sc.http, &ports, &sc.orgs, 50, &stop, &produced);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = sc.replicas[frozen].process.as_ref().unwrap().child.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    // The others take the frozen replica's shards once its Leases expired.
    let others: Vec<&Replica> = sc.replicas.iter().filter(|r| r.name != frozen_name).collect();
    support::wait_for(
        "the frozen replica's shards taken over",
        Duration::from_secs(LEASE_SECS + 10),
        || async {
            let mut held = Vec::new();
            for r in &others {
                held.extend(shards_of(&sc.http, r).await?);
            }
            frozen_shards.iter().all(|s| held.contains(s)).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Quiet: no more events, everything accepted delivered by the new owners, their logs settled.
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    producer.await.unwrap();
    let produced = std::mem::take(&mut *produced.lock().unwrap());
    assert!(
        produced.other.is_empty(),
        "answers other than 202 and 503: {:?}",
        produced.other
    );
    wait_delivered(&sc.receiver, &sc.targets, &produced.accepted, Duration::from_secs(60)).await;
    let fenced_orgs: Vec<&String> = sc
        .orgs
        .iter()
        .filter(|o| frozen_shards.contains(&shard_of(o)))
        .collect();
    let before = settled_segments(&sc.client, &sc.ns, &fenced_orgs).await;
    assert!(
        !before.is_empty(),
        "the frozen replica's organizations {fenced_orgs:?} have log segments"
    );
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    let held = wait_balanced(&sc.http, &sc.replicas, Duration::from_secs(30)).await;
    println!("after the freeze: {held:?}");
    let after = segments_of(&sc.client, &sc.ns, &fenced_orgs).await;
    let changed: Vec<String> = before
        .keys()
        .chain(after.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|name| before.get(*name) != after.get(*name))
        .map(|name| format!("{name}: {:?} -> {:?}", before.get(name), after.get(name)))
        .collect();
    assert!(
        changed.is_empty(),
        "the frozen replica's logs were written after its fences closed (created, updated or deleted):\n{}",
        changed.join("\n")
    );
    println!(
        "fencing: {} events accepted, {} answers 503; {} segments of {} fenced organizations untouched",
        produced.accepted.len(),
        produced.unavailable,
        before.len(),
        fenced_orgs.len()
    );
    sc.finish().await;
}

/// Every delivery-log segment of `orgs`, by name, with its resourceVersion.
async fn segments_of(client: &kube::Client, ns: &str, orgs: &[&String]) -> BTreeMap<String, String> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let configmaps: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), ns);
    let mut found = BTreeMap::new();
    for org in orgs {
        let selector = capy_webhooks::delivery_log::segment_labels(org)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let list = configmaps
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
            .unwrap();
        for cm in list.items {
            found.insert(
                cm.metadata.name.unwrap_or_default(),
                cm.metadata.resource_version.unwrap_or_default(),
            );
        }
    }
    found
}

/// [`segments_of`] once it has stayed the same for three looks a second apart (the writes that
/// follow the last delivery, deletes of superseded segments and the floor they raise, are done).
async fn settled_segments(client: &kube::Client, ns: &str, orgs: &[&String]) -> BTreeMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = segments_of(client, ns, orgs).await;
    let mut same = 0;
    while same < 2 {
        assert!(
            Instant::now() < deadline,
            "with every event delivered and no work left, the logs of {orgs:?} were still being \
             written after 60 s (an idle log writes nothing): {last:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = segments_of(client, ns, orgs).await;
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

/// Posts `body` to a replica's internal work route with `headers`; returns the status and the
/// answer (JSON, or `null`).
async fn post_work(http: &reqwest::Client, replica: &Replica, headers: &[(&str, String)], body: &[u8]) -> (u16, Value) {
    let mut request = http
        .post(format!(
            "http://127.0.0.1:{}{}",
            replica.ingest,
            capy_webhooks::work::WORK_PATH
        ))
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Issue 21, item 3: the internal work route takes work only from replicas (signed with their
/// key, never the producers' ingest token, never a stale or altered request), and believes
/// nothing its body says about an endpoint: a reference the owner does not know (another
/// namespace, another uid, another organization) is not found, and nothing is written for it.
/// REST operations forwarded between replicas still work.
#[tokio::test]
async fn the_internal_work_route_trusts_nothing_in_its_body() {
    use capy_webhooks::replica_key::{REPLICA_KEY_SECRET, ReplicaKey, unix_now};
    use capy_webhooks::work::{EndpointRef, WorkRequest};
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};

    let _turn = ONE_AT_A_TIME.lock().await;
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, "worktrust").await;
    let victim = support::test_namespace(&client, "worktrust-victim").await;
    let dir = logs_dir();
    let http = reqwest::Client::new();
    let replicas: Vec<Replica> = ["a", "b"].iter().map(|n| Replica::start(&ns, dir.path(), n)).collect();
    let held = wait_balanced(&http, &replicas, Duration::from_secs(60)).await;
    let orgs = orgs(10);
    let org = orgs
        .iter()
        .find(|o| held["b"].contains(&shard_of(o)))
        .expect("b owns one of ten organizations")
        .clone();
    let receiver = Receiver::start(Vec::new()).await;
    // Created, tested and listed through `a`: every operation is forwarded to `b`.
    let (_, keys) = create_endpoints(
        &client,
        &ns,
        &http,
        &replicas[..1],
        &receiver,
        std::slice::from_ref(&org),
        1,
    )
    .await;
    let key = &keys[&org];
    let (a, b) = (&replicas[0], &replicas[1]);
    let rest = format!("http://127.0.0.1:{}/v1/organizations/{org}/webhook-endpoints", a.api);
    let get = |url: String| {
        let request = http.get(url).bearer_auth(key);
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let listed = get(rest.clone()).await;
    let id = listed["webhook_endpoints"][0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("one endpoint listed: {listed}"))
        .to_string();
    // Replicas may still be settling who owns what (a shard just handed over answers 503 with
    // Retry-After, as documented): retried as a client would.
    let tested = support::wait_for("the forwarded test accepted", Duration::from_secs(20), || async {
        let r = http
            .post(format!("{rest}/{id}/test"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        if r.status() == 503 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            return None;
        }
        Some(r)
    })
    .await;
    assert_eq!(tested.status(), 202, "{:?}", tested.text().await);
    let deliveries = get(format!("{rest}/{id}/deliveries")).await;
    assert_eq!(
        deliveries["deliveries"].as_array().map(Vec::len),
        Some(1),
        "the forwarded test is listed through a: {deliveries}"
    );
    // The attempt is counted where it was made (b) and read through a.
    let stats = support::wait_for("the forwarded attempt counted", Duration::from_secs(20), || async {
        let stats = get(format!("{rest}/{id}/stats")).await;
        (stats["succeeded"].as_u64().unwrap_or(0) + stats["failed"].as_u64().unwrap_or(0) == 1).then_some(stats)
    })
    .await;
    assert_eq!(stats["hours"].as_array().map(Vec::len), Some(24), "{stats}");

    let endpoints: kube::Api<capy_webhooks::resources::WebhookEndpoint> = kube::Api::namespaced(client.clone(), &ns);
    let real = EndpointRef::of(&endpoints.get(&id).await.unwrap());
    let send_test = |endpoint: EndpointRef| serde_json::to_vec(&WorkRequest::SendTest { endpoint }).unwrap();
    let secrets: kube::Api<Secret> = kube::Api::namespaced(client.clone(), &ns);
    let stored = secrets.get(REPLICA_KEY_SECRET).await.unwrap();
    let bytes: [u8; 32] = stored.data.unwrap()["key"].0.clone().try_into().unwrap();
    let replica_key = ReplicaKey::new(bytes);
    let signed = |body: &[u8], at: i64| -> Vec<(&str, String)> {
        replica_key
            .sign("POST", capy_webhooks::work::WORK_PATH, at, body)
            .into_iter()
            .collect()
    };

    // The producers' token is no replica's credential, whatever else the request says.
    let body = send_test(real.clone());
    let producer = vec![
        ("authorization", format!("Bearer {INGEST_TOKEN}")),
        (capy_webhooks::work::FORWARDED_HEADER, "a".to_string()),
    ];
    assert_eq!(post_work(&http, b, &producer, &body).await.0, 401);
    // Nor is a signature that is stale, or over another body.
    assert_eq!(
        post_work(&http, b, &signed(&body, unix_now() - 120), &body).await.0,
        401
    );
    let other = send_test(EndpointRef {
        name: "other".into(),
        ..real.clone()
    });
    assert_eq!(post_work(&http, b, &signed(&other, unix_now()), &body).await.0, 401);

    // Signed, but naming what `b` does not know: not found, and nothing is written for it.
    let invented = [
        EndpointRef {
            namespace: victim.clone(),
            name: "invented".into(),
            uid: "00000000-0000-0000-0000-000000000001".into(),
            organization_id: org.clone(),
        },
        EndpointRef {
            uid: "00000000-0000-0000-0000-000000000002".into(),
            ..real.clone()
        },
        EndpointRef {
            organization_id: "org_elsewhere".into(),
            ..real.clone()
        },
    ];
    for reference in invented {
        let body = send_test(reference.clone());
        let (status, reply) = post_work(&http, b, &signed(&body, unix_now()), &body).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["failed"]["kind"], "not_found", "{reference:?}: {reply}");
        for op in [
            WorkRequest::Deliveries {
                endpoint: reference.clone(),
                limit: 1_000_000,
            },
            WorkRequest::Retry {
                endpoint: reference.clone(),
                delivery_id: "dlv_x".into(),
            },
            WorkRequest::AttemptStats {
                endpoint: reference.clone(),
            },
        ] {
            let body = serde_json::to_vec(&op).unwrap();
            let (status, reply) = post_work(&http, b, &signed(&body, unix_now()), &body).await;
            assert_eq!(status, 200, "{reply}");
            assert_eq!(reply["failed"]["kind"], "not_found", "{op:?}: {reply}");
        }
    }
    // The signature works: the real reference is done.
    let (status, reply) = post_work(&http, b, &signed(&body, unix_now()), &body).await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply.get("listed").is_some(), "{reply}");

    tokio::time::sleep(Duration::from_secs(3)).await;
    let written: Vec<String> = kube::Api::<ConfigMap>::namespaced(client.clone(), &victim)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .filter(|n| n != "kube-root-ca.crt")
        .collect();
    assert!(written.is_empty(), "written into {victim}: {written:?}");
    support::delete_namespace(&client, &victim).await;
    let found = second_writers(dir.path());
    assert!(found.is_empty(), "{found:?}");
    support::delete_namespace(&client, &ns).await;
}
