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
