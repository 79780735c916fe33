//! Pods on the real node (`hack/node.sh`, README "A real node on your machine"): the image's size,
//! `helm install` → every pod Ready, a pod's idle RSS beside the host process's, and a rolling
//! upgrade of the chart under 500 events/s. It runs last, on a control plane of its own (with the
//! controllers pods need), so the other scenarios' figures are untouched. Where a node cannot run
//! here, one row says why.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::{Receiver, ms, payload, percentile, root};

const NS: &str = "capy-webhooks";
const RATE: u32 = 500;
const ORGS: [&str; 4] = [
    "org_pods_bench_a",
    "org_pods_bench_b",
    "org_pods_bench_c",
    "org_pods_bench_d",
];

fn script(name: &str) -> PathBuf {
    root().join("hack").join(name)
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Cluster {
    dir: PathBuf,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
}

impl Cluster {
    fn kubectl(&self, args: &[&str]) -> String {
        run_ok(
            Command::new(&self.kubectl)
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(args),
            &format!("kubectl {}", args.join(" ")),
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script("node.sh")).arg("down").status();
        let _ = Command::new(script("cluster.sh")).arg("down").arg(&self.dir).status();
    }
}

fn mib(path: &Path) -> f64 {
    std::fs::metadata(path).map_or(f64::NAN, |m| m.len() as f64 / 1024.0 / 1024.0)
}

/// VmRSS of every process of the release's containers (found by their pod cgroup).
fn pod_rss_mib() -> Vec<f64> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if comm.trim() != "capy-webhooks" || !cgroup.contains("kubepods") {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if let Some(kb) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        {
            out.push(kb / 1024.0);
        }
    }
    out
}

#[derive(Default)]
struct Load {
    accepted: Vec<u64>,
    unavailable: u64,
    connection_errors: u64,
    latencies: Vec<f64>,
    failed: u64,
}

async fn send(http: &reqwest::Client, ingest: &str, token: &str, org: &str, seq: u64, load: &Mutex<Load>) {
    let first = Instant::now();
    while first.elapsed() < Duration::from_secs(60) {
        let res = http
            .post(format!("{ingest}/v1/organizations/{org}/events"))
            .bearer_auth(token)
            .header("idempotency-key", format!("{org}-{seq}"))
            .json(&json!({"type": "order.created", "data": payload(seq)}))
            .timeout(Duration::from_secs(20))
            .send()
            .await;
        match res {
            Ok(r) if r.status() == 202 => {
                let mut l = load.lock().await;
                l.accepted.push(seq);
                l.latencies.push(ms(first.elapsed()));
                return;
            }
            Ok(r) if r.status() == 503 => {
                load.lock().await.unavailable += 1;
                let wait: u64 = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(1);
                tokio::time::sleep(Duration::from_secs(wait.clamp(1, 5))).await;
            }
            Ok(_) => break,
            Err(_) => {
                load.lock().await.connection_errors += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    load.lock().await.failed += 1;
}

/// Runs the pods scenarios and adds their rows; `host_idle_rss` is the host process's idle RSS
/// measured earlier in the same run.
pub(super) async fn run(quick: bool, host_idle_rss: Option<f64>, row: &impl Fn(&str, String, String, &str)) {
    let check = Command::new(script("node.sh"))
        .arg("check")
        .output()
        .expect("hack/node.sh");
    if !check.status.success() {
        let why = String::from_utf8_lossy(&check.stdout).trim().to_string();
        row("Pods on a real node", format!("not run: {why}"), "-".into(), "-");
        return;
    }
    let tar = root().join("target/image/capy-webhooks.tar");
    let binary = root().join("target/release/capy-webhooks");
    row(
        "Image size (docker-archive, one layer)",
        format!("{:.1} MiB", mib(&tar)),
        format!("release binary {:.1} MiB", mib(&binary)),
        "-",
    );

    let dir = std::env::temp_dir().join(format!("capy-bench-pods-{}", std::process::id()));
    run_ok(
        Command::new(script("cluster.sh"))
            .arg("up")
            .arg(&dir)
            .args(["--watch-pid", &std::process::id().to_string()])
            .env("CAPY_CLUSTER_WORKLOADS", "true")
            .stderr(Stdio::inherit()),
        "hack/cluster.sh up",
    );
    let bin = PathBuf::from(run_ok(Command::new(script("cluster.sh")).arg("bin-dir"), "bin-dir").trim());
    let cluster = Cluster {
        kubeconfig: dir.join("kubeconfig"),
        kubectl: bin.join("kubectl"),
        dir,
    };
    let started = Instant::now();
    run_ok(
        Command::new(script("node.sh"))
            .arg("up")
            .arg(&cluster.kubeconfig)
            .args(["--watch-pid", &std::process::id().to_string()])
            .stderr(Stdio::inherit()),
        "hack/node.sh up",
    );
    let node_ready = started.elapsed();
    run_ok(
        Command::new(script("node.sh")).arg("load").arg(&tar),
        "hack/node.sh load",
    );
    let started = Instant::now();
    run_ok(
        // The write budget off, as in every throughput scenario of this bench (the host-process
        // rolling restart included): at 500 events/s the chart's default budget would answer 503.
        Command::new(script("deploy.sh"))
            .arg(&cluster.kubeconfig)
            .args(["--set-string", "delivery.logWriteBudget=0"]),
        "hack/deploy.sh",
    );
    row(
        "helm install → both pods Ready (2 replicas, kubelet probes)",
        format!("{:.1} s", started.elapsed().as_secs_f64()),
        format!("node up and Ready {:.1} s", node_ready.as_secs_f64()),
        "-",
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss = pod_rss_mib();
    row(
        "Pod RSS, idle (each replica)",
        rss.iter().map(|r| format!("{r:.1} MiB")).collect::<Vec<_>>().join(", "),
        host_idle_rss.map_or("-".into(), |r| format!("host process {r:.1} MiB")),
        "≤ 40 MiB",
    );

    // A rolling upgrade under load.
    let host_ip: IpAddr = run_ok(Command::new(script("node.sh")).arg("host-ip"), "host-ip")
        .trim()
        .parse()
        .unwrap();
    let rx = Receiver::start_on(host_ip).await;
    let token_b64 = cluster.kubectl(&[
        "-n",
        NS,
        "get",
        "secret",
        "capy-webhooks-ingest-token",
        "-o",
        "jsonpath={.data.token}",
    ]);
    let token = {
        use base64::Engine;
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(token_b64.trim())
                .unwrap(),
        )
        .unwrap()
    };
    let svc = |name: &str| cluster.kubectl(&["-n", NS, "get", "svc", name, "-o", "jsonpath={.spec.clusterIP}"]);
    let rest = format!("http://{}:8080", svc("capy-webhooks"));
    let ingest = format!("http://{}:8081", svc("capy-webhooks-ingest"));
    let http = reqwest::Client::new();
    for org in ORGS {
        let key = cluster.kubectl(&[
            "-n",
            NS,
            "exec",
            "deploy/capy-webhooks",
            "--",
            "/capy-webhooks",
            "api-key",
            "create",
            "--org",
            org,
        ]);
        let res: Value = http
            .post(format!("{rest}/v1/organizations/{org}/webhook-endpoints"))
            .bearer_auth(key.trim())
            .json(&json!({"url": format!("{}/deliver", rx.addr), "event_types": ["order.created"]}))
            .send()
            .await
            .expect("REST create")
            .json()
            .await
            .unwrap();
        assert!(res["plaintext_secret"].is_string(), "create: {res}");
    }
    run_ok(
        Command::new(script("node.sh")).args([
            "ctr",
            "images",
            "tag",
            "--force",
            "docker.io/library/capy-webhooks:dev",
            "docker.io/library/capy-webhooks:bench",
        ]),
        "ctr images tag",
    );
    let load = Arc::new(Mutex::new(Load::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));
    let producer = {
        let (http, ingest, token, load, stop, seq) = (
            http.clone(),
            ingest.clone(),
            token.clone(),
            load.clone(),
            stop.clone(),
            seq.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / RATE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sent = tokio::task::JoinSet::new();
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                let n = seq.fetch_add(1, Ordering::SeqCst);
                let org = ORGS[(n % ORGS.len() as u64) as usize];
                let (http, ingest, token, load) = (http.clone(), ingest.clone(), token.clone(), load.clone());
                sent.spawn(async move { send(&http, &ingest, &token, org, n, &load).await });
            }
            while sent.join_next().await.is_some() {}
        })
    };
    tokio::time::sleep(Duration::from_secs(if quick { 3 } else { 10 })).await;
    let kubeconfig = cluster.kubeconfig.clone();
    let took = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        run_ok(
            Command::new(script("deploy.sh")).arg(&kubeconfig).args([
                "--set-string",
                "delivery.logWriteBudget=0",
                "--set",
                "image.tag=bench",
            ]),
            "helm upgrade",
        );
        t.elapsed()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(if quick { 3 } else { 10 })).await;
    stop.store(true, Ordering::SeqCst);
    producer.await.unwrap();
    let load = load.lock().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let lost = loop {
        let arrived = rx.arrivals.lock().await;
        let lost = load.accepted.iter().filter(|s| !arrived.contains_key(s)).count();
        if lost == 0 || Instant::now() > deadline {
            break lost;
        }
        drop(arrived);
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut lat = load.latencies.clone();
    lat.sort_by(f64::total_cmp);
    row(
        &format!("Rolling upgrade on pods (helm upgrade, 2 replicas, write budget off) under {RATE} events/s"),
        format!(
            "{} events accepted, {lost} lost, {} never accepted; {} answers 503, {} connections refused \
             (retried); ingest p50 {:.1} ms, p99 {:.1} ms; rollout {:.1} s",
            load.accepted.len(),
            load.failed,
            load.unavailable,
            load.connection_errors,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            took.as_secs_f64()
        ),
        "-".into(),
        "0 lost",
    );
    drop(cluster);
}
