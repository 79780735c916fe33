//! Crash and outage safety: the operator killed with SIGKILL while deliveries are pending, and
//! the API server stopped during ingest. Its own test binary, so stopping the API server
//! disturbs no other test. Its own harness (libtest-mimic): the outage tests need the control
//! plane this process starts, and are counted ignored, not passed, against another cluster.

mod support;

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::harness::{Needs, async_trial};
use support::operator::{INGEST_TOKEN, Operator, Options};
use support::process::OperatorProcess;
use support::receiver::{Answer, Receiver};

const ORG: &str = "org_restart";

fn main() {
    let mut args = libtest_mimic::Arguments::from_args();
    // The tests take turns: the outage tests pause the API server they all share, and any test
    // running beside them would see an outage it did not ask for.
    args.test_threads = Some(1);
    let trials = vec![
        async_trial(
            "sigkill_with_pending_deliveries_loses_nothing",
            Needs::AnyCluster,
            sigkill_with_pending_deliveries_loses_nothing,
        ),
        async_trial(
            "a_fifo_endpoint_receives_in_ingest_order_across_a_restart",
            Needs::AnyCluster,
            a_fifo_endpoint_receives_in_ingest_order_across_a_restart,
        ),
        async_trial(
            "an_api_server_outage_answers_503_and_loses_nothing_acknowledged",
            Needs::OwnControlPlane,
            an_api_server_outage_answers_503_and_loses_nothing_acknowledged,
        ),
        async_trial(
            "an_outage_with_several_writes_in_flight_loses_nothing_acknowledged",
            Needs::OwnControlPlane,
            an_outage_with_several_writes_in_flight_loses_nothing_acknowledged,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Listeners, and retries 3 s apart.
fn operator_args(api_port: u16, ingest_port: u16) -> Vec<String> {
    [
        "--components",
        "api,controller,dispatcher",
        "--api-listen",
        &format!("127.0.0.1:{api_port}"),
        "--ingest-listen",
        &format!("127.0.0.1:{ingest_port}"),
        "--retry-schedule",
        "0s,3s,3s,3s,3s",
    ]
    .map(String::from)
    .to_vec()
}

async fn wait_http_up(http: &reqwest::Client, api_port: u16) {
    support::wait_for("operator REST API up", Duration::from_secs(60), || async {
        http.get(format!("http://127.0.0.1:{api_port}/openapi.json"))
            .send()
            .await
            .ok()
            .filter(|r| r.status() == 200)
    })
    .await;
}

async fn ingest(http: &reqwest::Client, ingest_port: u16, data: Value) -> (u16, Value) {
    let res = http
        .post(format!("http://127.0.0.1:{ingest_port}/v1/organizations/{ORG}/events"))
        .bearer_auth(INGEST_TOKEN)
        .json(&json!({"type": "order.created", "data": data}))
        .timeout(Duration::from_secs(20))
        .send()
        .await;
    match res {
        Ok(res) => {
            let status = res.status().as_u16();
            (status, res.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

async fn sigkill_with_pending_deliveries_loses_nothing() {
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, "sigkill").await;
    let dir = tempfile::tempdir().unwrap();
    let (api_port, ingest_port) = (free_port(), free_port());
    let http = reqwest::Client::new();
    const EVENTS: usize = 20;
    // Every first attempt fails, so every delivery is pending (retry due 3 s later) when the
    // operator dies.
    let receiver = Receiver::start(vec![Answer::Status(503); EVENTS]).await;

    let args = operator_args(api_port, ingest_port);
    let kubeconfig = support::kubeconfig_path();
    let mut first = OperatorProcess::start(&ns, &kubeconfig, dir.path(), "first.log", &args);
    wait_http_up(&http, api_port).await;
    let (_, key) = capy_webhooks::auth::api_keys::create_key(&client, &ns, ORG, None, None)
        .await
        .unwrap();
    let base = format!("http://127.0.0.1:{api_port}/v1/organizations/{ORG}/webhook-endpoints");
    let id = support::process::create_endpoint(&http, api_port, ORG, &key, &receiver.url("/in")).await;
    for n in 0..EVENTS {
        let (status, body) = ingest(&http, ingest_port, json!({"seq": n})).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["deliveries"], 1);
    }
    support::wait_for("first attempts made", Duration::from_secs(30), || async {
        (receiver.received().len() >= EVENTS).then_some(())
    })
    .await;
    first.kill();

    let _second = OperatorProcess::start(&ns, &kubeconfig, dir.path(), "second.log", &args);
    wait_http_up(&http, api_port).await;
    let deliveries = support::wait_for(
        "every delivery succeeded after the restart",
        Duration::from_secs(60),
        || async {
            let res = http
                .get(format!("{base}/{id}/deliveries?limit=100"))
                .bearer_auth(&key)
                .send()
                .await
                .ok()?;
            let body: Value = res.json().await.ok()?;
            let list = body["deliveries"].as_array()?.clone();
            (list.len() == EVENTS && list.iter().all(|d| d["state"] == "succeeded")).then_some(list)
        },
    )
    .await;
    let ids: HashSet<String> = deliveries
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    // After the scripted 503s the receiver answers 200: those requests carry every delivery.
    let delivered: HashSet<String> = receiver.received()[EVENTS..]
        .iter()
        .map(|r| r.header("webhook-id").to_string())
        .collect();
    assert!(
        ids.is_subset(&delivered),
        "every pending delivery was sent after the restart"
    );
    let seqs: HashSet<u64> = receiver
        .received()
        .iter()
        .map(|r| r.json()["data"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs.len(), EVENTS);
    // (An attempt whose outcome was not yet written when the process died is not counted: the
    // log only knows what it persisted, and the delivery is simply sent again.)
}

/// The answers of a receiver that fails at random: `share_500` in a thousand are 500s, from a
/// seeded xorshift, so a failing run fails again the same way.
fn seeded_failures(count: usize, share_500: u64, seed: u64) -> Vec<Answer> {
    let mut x = seed;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 1000 < share_500 {
                Answer::Status(500)
            } else {
                Answer::Status(200)
            }
        })
        .collect()
}

/// Ordered delivery end to end: 500 events to a `fifo` endpoint whose receiver answers 500 to
/// 30 % of requests, with the operator stopped (SIGTERM) and started again half-way. The
/// receiver sees every event succeed, first successes in ingest order, and no attempt of an event
/// before every earlier event succeeded.
async fn a_fifo_endpoint_receives_in_ingest_order_across_a_restart() {
    const EVENTS: usize = 500;
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, "fifo").await;
    let dir = tempfile::tempdir().unwrap();
    let (api_port, ingest_port) = (free_port(), free_port());
    let http = reqwest::Client::new();
    // Requests are answered in the order they come (one at a time, if the order holds); past the
    // script, 200.
    let script = seeded_failures(4 * EVENTS, 300, 0x9e37_79b9_7f4a_7c15);
    let receiver = Receiver::start(script.clone()).await;
    // Retries 100 ms apart, 20 attempts: no delivery exhausts them (0.3^20).
    let schedule = format!("0s{}", ",100ms".repeat(19));
    let mut args = operator_args(api_port, ingest_port);
    let at = args.iter().position(|a| a == "--retry-schedule").unwrap();
    args[at + 1] = schedule;
    let kubeconfig = support::kubeconfig_path();
    let mut first = OperatorProcess::start(&ns, &kubeconfig, dir.path(), "first.log", &args);
    wait_http_up(&http, api_port).await;
    let (_, key) = capy_webhooks::auth::api_keys::create_key(&client, &ns, ORG, None, None)
        .await
        .unwrap();
    let base = format!("http://127.0.0.1:{api_port}/v1/organizations/{ORG}/webhook-endpoints");
    let created: Value = support::wait_for("fifo endpoint created", Duration::from_secs(60), || async {
        let res = http
            .post(&base)
            .bearer_auth(&key)
            .json(&json!({"url": receiver.url("/in"), "ordering": "fifo"}))
            .send()
            .await
            .ok()?;
        (res.status() == 201).then_some(())?;
        res.json().await.ok()
    })
    .await;
    assert_eq!(created["webhook_endpoint"]["ordering"], "fifo", "{created}");
    let id = created["webhook_endpoint"]["id"].as_str().unwrap().to_string();
    // Update both ways; the Endpoint object names it only when fifo, the CR holds it.
    for (ordering, shown) in [("unordered", Value::Null), ("fifo", json!("fifo"))] {
        let res = http
            .patch(format!("{base}/{id}"))
            .bearer_auth(&key)
            .json(&json!({"ordering": ordering}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let updated: Value = res.json().await.unwrap();
        assert_eq!(updated["webhook_endpoint"]["ordering"], shown, "{updated}");
    }
    let endpoints: kube::Api<capy_webhooks::resources::WebhookEndpoint> = kube::Api::namespaced(client.clone(), &ns);
    let stored = endpoints.get(&id).await.unwrap();
    assert_eq!(stored.spec.ordering, capy_webhooks::resources::Ordering::Fifo);

    // The outcome of each request the receiver got: (event seq, succeeded).
    let outcomes = |receiver: &Receiver| -> Vec<(u64, bool)> {
        receiver
            .received()
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let ok = !matches!(script.get(i), Some(Answer::Status(500)));
                (r.json()["data"]["seq"].as_u64().unwrap(), ok)
            })
            .collect()
    };
    let succeeded = |outcomes: &[(u64, bool)]| {
        outcomes
            .iter()
            .filter(|(_, ok)| *ok)
            .map(|(seq, _)| *seq)
            .collect::<HashSet<u64>>()
            .len()
    };
    for n in 0..EVENTS {
        let (status, body) = ingest(&http, ingest_port, json!({"seq": n})).await;
        assert_eq!(status, 202, "{body}");
    }
    support::wait_for("half the events delivered", Duration::from_secs(60), || async {
        (succeeded(&outcomes(&receiver)) >= EVENTS / 2).then_some(())
    })
    .await;
    let before = succeeded(&outcomes(&receiver));
    assert!(before < EVENTS, "the restart comes before the end");
    let pid = first.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let exited = tokio::task::spawn_blocking(move || first.child.wait().map(|_| first))
        .await
        .unwrap()
        .unwrap();
    drop(exited);

    let _second = OperatorProcess::start(&ns, &kubeconfig, dir.path(), "second.log", &args);
    support::wait_for("every event delivered", Duration::from_secs(90), || async {
        (succeeded(&outcomes(&receiver)) == EVENTS).then_some(())
    })
    .await;
    let outcomes = outcomes(&receiver);
    // Every request is of the next event in ingest order, or a repeat of one that succeeded
    // (sent again after an outcome that was not written yet): never of a later one.
    let mut done: HashSet<u64> = HashSet::new();
    let mut firsts = Vec::new();
    for (i, (seq, ok)) in outcomes.iter().enumerate() {
        let next = done.len() as u64;
        assert!(
            *seq == next || done.contains(seq),
            "request {i} is of event {seq} while event {next} has not succeeded (restart after {before})"
        );
        if *ok && done.insert(*seq) {
            firsts.push(*seq);
        }
    }
    assert_eq!(firsts, (0..EVENTS as u64).collect::<Vec<_>>());
    let failures = outcomes.iter().filter(|(_, ok)| !ok).count();
    assert!(
        failures > EVENTS / 5,
        "the receiver failed often enough to matter: {failures}"
    );
}

/// The pid file of the API server this process started (its trials need their own control plane).
fn apiserver_pid() -> PathBuf {
    support::cluster_dir()
        .expect("this process started the control plane")
        .join("kube-apiserver.pid")
}

fn signal(pid_file: &Path, sig: &str) {
    let pid = std::fs::read_to_string(pid_file).unwrap();
    let ok = Command::new("kill").args([sig, pid.trim()]).status().unwrap().success();
    assert!(ok, "kill {sig} {pid}");
}

/// Resumes the API server even if the test fails half-way.
struct Resume(PathBuf);
impl Drop for Resume {
    fn drop(&mut self) {
        signal(&self.0, "-CONT");
    }
}

/// An operator in a fresh namespace that answers 503 after 2 s without a durable write, an API
/// key, and a receiver.
async fn outage_setup(prefix: &str) -> (Operator, String, Receiver) {
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, prefix).await;
    let opts = Options {
        dispatcher: true,
        persist_timeout: Duration::from_secs(2),
        ..Options::default()
    };
    let op = Operator::start(&client, &ns, opts).await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    (op, key, Receiver::start(vec![]).await)
}

async fn an_api_server_outage_answers_503_and_loses_nothing_acknowledged() {
    let pid_file = apiserver_pid();
    let (op, key, receiver) = outage_setup("outage").await;
    let (status, created, _) = op
        .call(
            "POST",
            &op.url(ORG, ""),
            Some(&key),
            Some(json!({"url": receiver.url("/in")})),
        )
        .await;
    assert_eq!(status, 201, "{created}");

    let http = reqwest::Client::new();
    let ingest_port: u16 = op.ingest_base.rsplit(':').next().unwrap().parse().unwrap();
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    let started = Instant::now();
    let mut stopped: Option<Resume> = None;
    let mut seq = 0u64;
    while started.elapsed() < Duration::from_secs(10) {
        let elapsed = started.elapsed();
        if stopped.is_none() && elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(6) {
            signal(&pid_file, "-STOP");
            stopped = Some(Resume(pid_file.clone()));
        }
        if elapsed >= Duration::from_secs(6) {
            stopped.take(); // SIGCONT
        }
        let (status, body) = ingest(&http, ingest_port, json!({"seq": seq})).await;
        match status {
            202 => acknowledged.push(seq),
            503 => {
                assert!(body["error"].as_str().unwrap().contains("not accepted"), "{body}");
                refused += 1;
            }
            other => panic!("unexpected status {other}: {body}"),
        }
        seq += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(stopped);
    assert!(refused > 0, "the outage produced 503s");
    assert!(!acknowledged.is_empty());
    // Everything acknowledged is delivered once the API server is back (refused events may be
    // delivered too: at least once).
    support::wait_for(
        "every acknowledged event delivered",
        Duration::from_secs(60),
        || async {
            let seen: HashSet<u64> = receiver
                .received()
                .iter()
                .map(|r| r.json()["data"]["seq"].as_u64().unwrap())
                .collect();
            acknowledged.iter().all(|s| seen.contains(s)).then_some(())
        },
    )
    .await;
    op.stop().await;
}

async fn an_outage_with_several_writes_in_flight_loses_nothing_acknowledged() {
    let pid_file = apiserver_pid();
    let (op, key, receiver) = outage_setup("outage-many").await;
    const ENDPOINTS: usize = 3;
    for n in 0..ENDPOINTS {
        let (status, created, _) = op
            .call(
                "POST",
                &op.url(ORG, ""),
                Some(&key),
                Some(json!({"url": receiver.url(&format!("/in{n}"))})),
            )
            .await;
        assert_eq!(status, 201, "{created}");
    }

    // 16 producers at once keep several log writes of the organization in flight; the API server
    // is stopped from 2 s to 6 s, with writes outstanding.
    let ingest_port: u16 = op.ingest_base.rsplit(':').next().unwrap().parse().unwrap();
    let started = Instant::now();
    let producers: Vec<_> = (0..16u64)
        .map(|p| {
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let (mut acknowledged, mut refused) = (Vec::new(), 0);
                let mut seq = p * 1_000_000;
                while started.elapsed() < Duration::from_secs(10) {
                    seq += 1;
                    let (status, body) = ingest(&http, ingest_port, json!({"seq": seq})).await;
                    match status {
                        202 => {
                            assert_eq!(body["deliveries"], ENDPOINTS);
                            acknowledged.push(seq);
                        }
                        503 => refused += 1,
                        other => panic!("unexpected status {other}: {body}"),
                    }
                }
                (acknowledged, refused)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(&pid_file, "-STOP");
    let stopped = Resume(pid_file.clone());
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(stopped); // SIGCONT
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for producer in producers {
        let (a, r) = producer.await.unwrap();
        acknowledged.extend(a);
        refused += r;
    }
    eprintln!("{} events acknowledged, {refused} refused", acknowledged.len());
    assert!(refused > 0, "the outage produced 503s");
    assert!(!acknowledged.is_empty());
    support::wait_for(
        "every acknowledged event delivered to every endpoint",
        Duration::from_secs(90),
        || async {
            let mut seen: std::collections::HashMap<u64, HashSet<String>> = Default::default();
            for r in receiver.received() {
                let seq = r.json()["data"]["seq"].as_u64().unwrap();
                seen.entry(seq).or_default().insert(r.header("webhook-id").to_string());
            }
            acknowledged
                .iter()
                .all(|s| seen.get(s).is_some_and(|ids| ids.len() >= ENDPOINTS))
                .then_some(())
        },
    )
    .await;
    op.stop().await;
}
