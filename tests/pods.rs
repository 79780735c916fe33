//! The operator as pods on a real node: the image built by `make image`, the chart installed
//! with Helm, kubelet's probes, upgrades and evictions under load, and the host left as found.
//!
//! One node (`hack/node.sh`: containerd, runc, the CNI bridge, kubelet, kube-proxy,
//! kube-scheduler) joins this binary's own control plane. The phases share that node and one
//! release and run in order, so this file has its own harness (libtest-mimic): each phase is a
//! test in the summary, and the last one removes the node and compares the host with what it was
//! before the first. Where a node cannot run (not root, not Linux) every phase is reported
//! `ignored` with the reason, never passed; under CI that is a failure.
//!
//! Everything the tests reach is what a user reaches: the Services (from the host through the
//! node's routes, or `kubectl port-forward`), `kubectl exec`, `kubectl logs`, the Eviction API.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::ListParams;
use kube::{Api, Client};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::{Value, json};
use support::ok;
use support::receiver::{Received, Receiver};

const NS: &str = "capy-webhooks";
const RELEASE: &str = "capy-webhooks";
/// The chart's default `leaseDuration`.
const LEASE_DURATION: Duration = Duration::from_secs(15);
/// Organizations the load is spread over; the first is the "busy" one whose owner is deleted.
const LOAD_ORGS: [&str; 4] = ["org_pods_a", "org_pods_b", "org_pods_c", "org_pods_d"];
const EVENTS_PER_SECOND: u32 = 100;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn main() {
    let mut args = Arguments::from_args();
    // One node, one release: the phases build on each other.
    args.test_threads = Some(1);
    let not_here = node_cannot_run();
    if let Some(why) = &not_here {
        eprintln!("pods tests NOT RUN: a node cannot run here: {why}");
        if std::env::var_os("CI").is_some_and(|v| v == "true") {
            eprintln!("CI=true: the pods tests must run in CI");
            std::process::exit(1);
        }
    } else {
        // The controllers pods need (Deployments, EndpointSlices, PDBs, ...) in this binary's
        // control plane. Set before any thread starts.
        unsafe { std::env::set_var("CAPY_CLUSTER_WORKLOADS", "true") };
    }
    let phases: Vec<(&str, Phase)> = vec![
        ("p1_install_two_replicas_ready_as_65532_with_a_read_only_root", install),
        ("p2_the_readme_path_on_pods", readme_path),
        ("p3_helm_upgrade_rolls_one_pod_at_a_time_under_load", rolling_upgrade),
        ("p4_deleting_the_busy_shard_owner_loses_nothing", delete_shard_owner),
        ("p5_the_pdb_allows_one_eviction_at_a_time", evictions),
        ("p6_logs_are_json_lines_without_secrets", logs),
        ("p7_node_down_leaves_the_host_as_found", node_down),
    ];
    let trials = phases
        .into_iter()
        .map(|(name, phase)| Trial::test(name, move || run_phase(phase)).with_ignored_flag(not_here.is_some()))
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

/// Why a node cannot run here (`hack/node.sh check`), or `None`.
fn node_cannot_run() -> Option<String> {
    let out = Command::new(root().join("hack/node.sh"))
        .arg("check")
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Err(e) => Some(format!("cannot run hack/node.sh: {e}")),
    }
}

/// One phase: it may panic, as tests do.
type Phase = fn(&mut State);

/// What the phases share.
struct State {
    rt: tokio::runtime::Runtime,
    /// Set by the first phase; the others fail at once without it.
    installed: bool,
    before: Option<BTreeSet<String>>,
    receiver: Option<Receiver>,
    /// Every signing secret, API key and token handed out: none may appear in a log.
    secrets: Vec<String>,
    /// Receiver path → (organization, signing secret).
    endpoints: HashMap<String, (String, String)>,
    /// Organization → API key.
    keys: HashMap<String, String>,
    ingest_token: String,
    seq: Arc<AtomicU64>,
}

static STATE: OnceLock<Mutex<State>> = OnceLock::new();

fn run_phase(phase: Phase) -> Result<(), Failed> {
    let state = STATE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        Mutex::new(State {
            rt,
            installed: false,
            before: None,
            receiver: None,
            secrets: Vec::new(),
            endpoints: HashMap::new(),
            keys: HashMap::new(),
            ingest_token: String::new(),
            seq: Arc::new(AtomicU64::new(0)),
        })
    });
    let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| phase(&mut guard)));
    eprintln!("[pods] phase took {:.1}s", started.elapsed().as_secs_f64());
    result.map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into());
        Failed::from(msg)
    })
}

fn require_install(state: &State) {
    assert!(state.installed, "the release is not installed (the first phase failed)");
}

// --- commands -------------------------------------------------------------------------------

fn node_sh(args: &[&str]) -> Output {
    Command::new(root().join("hack/node.sh"))
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("cannot run hack/node.sh")
}

fn kubectl(args: &[&str]) -> String {
    ok(&format!("kubectl {}", args.join(" ")), support::kubectl(args))
}

/// `hack/deploy.sh` (what `make deploy` runs) against this binary's control plane.
fn deploy(extra: &[&str]) -> Duration {
    let started = Instant::now();
    let out = Command::new(root().join("hack/deploy.sh"))
        .arg(support::kubeconfig_path())
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run hack/deploy.sh");
    ok("hack/deploy.sh", out);
    started.elapsed()
}

fn host_ip() -> IpAddr {
    ok("hack/node.sh host-ip", node_sh(&["host-ip"]))
        .trim()
        .parse()
        .expect("host-ip prints an address")
}

fn image_tar(name: &str) -> PathBuf {
    let tar = root().join("target/image").join(name);
    assert!(tar.is_file(), "{} is missing: run `make image` first", tar.display());
    tar
}

// --- the host, before and after ---------------------------------------------------------------

/// What a node may change on the host: network links, routes, namespaces and firewall rules,
/// mounts, cgroups, the sysctls kubelet sets, and the fixed paths of kubelet and containerd.
fn host_state() -> BTreeSet<String> {
    let mut s = BTreeSet::new();
    let cmd = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    for line in cmd("iptables-save", &[]).lines().filter(|l| !l.starts_with('#')) {
        // Chain policies carry packet counters, which move with any traffic.
        let line = line.split(" [").next().unwrap_or(line);
        s.insert(format!("iptables {line}"));
    }
    for line in cmd("ip", &["-o", "link", "show"]).lines() {
        if let Some(name) = line.split(':').nth(1) {
            s.insert(format!("link {}", name.trim()));
        }
    }
    for line in cmd("ip", &["route", "show", "table", "all"]).lines() {
        s.insert(format!("route {line}"));
    }
    for line in cmd("ip", &["netns", "list"]).lines() {
        s.insert(format!("netns {line}"));
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mountinfo.lines() {
        if let Some(point) = line.split(' ').nth(4) {
            s.insert(format!("mount {point}"));
        }
    }
    let mut stack = vec![(PathBuf::from("/sys/fs/cgroup"), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                s.insert(format!("cgroup {}", e.path().display()));
                if depth < 4 {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }
    for key in [
        "vm/overcommit_memory",
        "vm/panic_on_oom",
        "kernel/panic",
        "kernel/panic_on_oops",
        "kernel/keys/root_maxkeys",
        "kernel/keys/root_maxbytes",
        "net/ipv4/ip_forward",
        "net/ipv4/conf/all/route_localnet",
        "net/netfilter/nf_conntrack_max",
    ] {
        let v = std::fs::read_to_string(format!("/proc/sys/{key}")).unwrap_or_default();
        s.insert(format!("sysctl {key}={}", v.trim()));
    }
    for p in [
        "/var/lib/kubelet",
        "/var/log/pods",
        "/var/log/containers",
        "/run/containerd",
        "/var/lib/cni",
        "/run/netns",
        "/etc/cni",
        "/opt/cni",
        "/var/lib/containerd",
        "/usr/libexec/kubernetes",
        "/var/lib/capy-node",
        "/run/capy-node",
    ] {
        if Path::new(p).exists() {
            s.insert(format!("path {p}"));
        }
    }
    s
}

// --- pods -----------------------------------------------------------------------------------

async fn release_pods(client: &Client) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    pods.list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}")))
        .await
        .expect("list pods")
        .items
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// Waits until exactly `n` pods of the release exist, none terminating, every one Ready.
async fn wait_settled(client: &Client, n: usize, within: Duration) -> Vec<Pod> {
    support::wait_for(&format!("{n} Ready pods and no other"), within, || async {
        let pods = release_pods(client).await;
        (pods.len() == n && pods.iter().all(|p| is_ready(p) && !terminating(p))).then_some(pods)
    })
    .await
}

/// The host pid of a pod's container (`ctr tasks ls` on the node).
fn container_pid(pod: &Pod) -> u32 {
    let id = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .and_then(|c| c.container_id.clone())
        .expect("a running container");
    let id = id.trim_start_matches("containerd://");
    let tasks = ok("ctr tasks ls", node_sh(&["ctr", "tasks", "ls"]));
    tasks
        .lines()
        .find(|l| l.starts_with(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no task {id} on the node:\n{tasks}"))
}

fn service_url(client_services: &[Service], name: &str, port: u16) -> String {
    let svc = client_services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no Service {name}"));
    let ip = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .expect("a ClusterIP");
    format!("http://{ip}:{port}")
}

/// The REST and ingest Services' addresses: the host reaches Service IPs through the node.
async fn service_urls(client: &Client) -> (String, String) {
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let list = services
        .list(&ListParams::default())
        .await
        .expect("list services")
        .items;
    (
        service_url(&list, RELEASE, 8080),
        service_url(&list, &format!("{RELEASE}-ingest"), 8081),
    )
}

// --- the load -------------------------------------------------------------------------------

#[derive(Default)]
struct Load {
    /// (organization, seq, when it was first sent) of every event answered 202.
    accepted: Vec<(String, u64, Instant)>,
    unavailable: u64,
    connection_errors: u64,
    /// Ingest latency of the answer that accepted each event (retries included).
    latencies: Vec<Duration>,
    other: Vec<String>,
}

/// Posts one event, as a producer should: 503 retried after `Retry-After`, a connection that
/// failed retried with the same Idempotency-Key, for at most 60 s.
async fn send_event(http: &reqwest::Client, ingest: &str, token: &str, org: &str, seq: u64, load: &Mutex<Load>) {
    let first = Instant::now();
    while first.elapsed() < Duration::from_secs(60) {
        let res = http
            .post(format!("{ingest}/v1/organizations/{org}/events"))
            .bearer_auth(token)
            .header("idempotency-key", format!("{org}-{seq}"))
            .json(&json!({"type": "order.created", "data": {"seq": seq}}))
            .timeout(Duration::from_secs(20))
            .send()
            .await;
        match res {
            Ok(r) if r.status() == 202 => {
                let mut l = load.lock().unwrap();
                l.accepted.push((org.to_string(), seq, first));
                l.latencies.push(first.elapsed());
                return;
            }
            Ok(r) if r.status() == 503 => {
                load.lock().unwrap().unavailable += 1;
                let wait: u64 = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(1);
                tokio::time::sleep(Duration::from_secs(wait.clamp(1, 5))).await;
            }
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                load.lock()
                    .unwrap()
                    .other
                    .push(format!("{org}/{seq}: {status}: {body}"));
                return;
            }
            Err(_) => {
                load.lock().unwrap().connection_errors += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    load.lock()
        .unwrap()
        .other
        .push(format!("{org}/{seq}: never accepted within 60 s"));
}

/// Sends `EVENTS_PER_SECOND` events round-robin over `LOAD_ORGS` until `stop`, then waits for
/// every answer.
fn spawn_load(
    http: &reqwest::Client,
    ingest: &str,
    token: &str,
    seq: &Arc<AtomicU64>,
    stop: &Arc<AtomicBool>,
    load: &Arc<Mutex<Load>>,
) -> tokio::task::JoinHandle<()> {
    let (http, ingest, token, seq, stop, load) = (
        http.clone(),
        ingest.to_string(),
        token.to_string(),
        seq.clone(),
        stop.clone(),
        load.clone(),
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / EVENTS_PER_SECOND);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent = tokio::task::JoinSet::new();
        while !stop.load(Ordering::SeqCst) {
            tick.tick().await;
            let n = seq.fetch_add(1, Ordering::SeqCst);
            let org = LOAD_ORGS[(n % LOAD_ORGS.len() as u64) as usize];
            let (http, ingest, token, load) = (http.clone(), ingest.clone(), token.clone(), load.clone());
            sent.spawn(async move { send_event(&http, &ingest, &token, org, n, &load).await });
        }
        while sent.join_next().await.is_some() {}
    })
}

/// (organization, seq) → when it first reached its endpoint, verifying every signature.
fn deliveries(received: &[Received], endpoints: &HashMap<String, (String, String)>) -> HashMap<(String, u64), Instant> {
    let mut got = HashMap::new();
    for r in received {
        let Some((org, secret)) = endpoints.get(&r.path) else {
            continue;
        };
        let wh = standardwebhooks::Webhook::new(secret).unwrap();
        wh.verify(&r.body, &r.headers)
            .unwrap_or_else(|e| panic!("the signature of a delivery to {} does not verify: {e}", r.path));
        let body = r.json();
        if let Some(seq) = body["data"]["seq"].as_u64() {
            got.entry((org.clone(), seq)).or_insert(r.at);
        }
    }
    got
}

/// Waits until every accepted event reached its organization's endpoint; panics naming the
/// missing ones after `within`.
async fn wait_all_delivered(state: &State, load: &Load, within: Duration) -> HashMap<(String, u64), Instant> {
    let receiver = state.receiver.as_ref().expect("a receiver");
    let started = Instant::now();
    loop {
        let got = deliveries(&receiver.received(), &state.endpoints);
        let missing: Vec<_> = load
            .accepted
            .iter()
            .filter(|(org, seq, _)| !got.contains_key(&(org.clone(), *seq)))
            .collect();
        if missing.is_empty() {
            return got;
        }
        assert!(
            started.elapsed() < within,
            "{} of {} accepted events never delivered, e.g. {:?}",
            missing.len(),
            load.accepted.len(),
            missing
                .iter()
                .take(5)
                .map(|(o, s, _)| format!("{o}/{s}"))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn p99(latencies: &[Duration]) -> Duration {
    let mut v = latencies.to_vec();
    v.sort();
    v.get((v.len() * 99 / 100).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// Creates an endpoint through the REST Service: (id, signing secret).
async fn create_endpoint(rest: &str, key: &str, org: &str, url: &str) -> (String, String) {
    let res = reqwest::Client::new()
        .post(format!("{rest}/v1/organizations/{org}/webhook-endpoints"))
        .bearer_auth(key)
        .json(&json!({"url": url, "event_types": ["order.created", "ping.*"]}))
        .send()
        .await
        .expect("REST create");
    let status = res.status();
    let body: Value = res.json().await.expect("JSON");
    assert_eq!(status, 201, "create endpoint: {body}");
    let secret = body["plaintext_secret"].as_str().expect("plaintext_secret").to_string();
    (body["webhook_endpoint"]["id"].as_str().unwrap().to_string(), secret)
}

/// An endpoint of `org` at the receiver's `path`, its secret remembered.
fn add_endpoint(state: &mut State, rest: &str, org: &str, path: &str) -> String {
    let url = state.receiver.as_ref().expect("a receiver").url(path);
    let key = state.keys.get(org).expect("an API key").clone();
    let (id, secret) = state.rt.block_on(create_endpoint(rest, &key, org, &url));
    state.secrets.push(secret.clone());
    state.endpoints.insert(path.to_string(), (org.to_string(), secret));
    id
}

fn mint_key(org: &str) -> String {
    let out = kubectl(&[
        "-n",
        NS,
        "exec",
        &format!("deploy/{RELEASE}"),
        "--",
        "/capy-webhooks",
        "api-key",
        "create",
        "--org",
        org,
    ]);
    let key = out.trim().to_string();
    assert!(key.starts_with("capy_live_"), "api-key create printed {out:?}");
    key
}

// --- phases ---------------------------------------------------------------------------------

/// 1. The image loaded, the chart installed with two replicas: both Ready through kubelet's
///    probes, the container's process runs as 65532, its root filesystem refuses a write, no
///    restart.
fn install(state: &mut State) {
    let kubeconfig = support::kubeconfig_path();
    // A node left by an earlier run goes first, so that "before" is the host without any node.
    ok("hack/node.sh down", node_sh(&["down"]));
    state.before = Some(host_state());
    let started = Instant::now();
    ok(
        "hack/node.sh up",
        node_sh(&[
            "up",
            kubeconfig.to_str().unwrap(),
            "--watch-pid",
            &std::process::id().to_string(),
        ]),
    );
    eprintln!("[pods] node Ready in {:.1}s", started.elapsed().as_secs_f64());
    let tar = image_tar("capy-webhooks.tar");
    ok("hack/node.sh load", node_sh(&["load", tar.to_str().unwrap()]));
    let took = deploy(&[]);
    eprintln!("[pods] helm install -> every pod Ready in {:.1}s", took.as_secs_f64());
    state.rt.block_on(async {
        let client = support::client().await;
        let pods = wait_settled(&client, 2, Duration::from_secs(120)).await;
        for pod in &pods {
            let status = pod.status.as_ref().unwrap();
            let cs = &status.container_statuses.as_ref().unwrap()[0];
            assert_eq!(cs.restart_count, 0, "{} restarted", name(pod));
            assert!(cs.ready, "{} not ready", name(pod));
            let pid = container_pid(pod);
            let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let uid = proc_status.lines().find(|l| l.starts_with("Uid:")).unwrap();
            let gid = proc_status.lines().find(|l| l.starts_with("Gid:")).unwrap();
            assert_eq!(
                uid.split_whitespace().skip(1).collect::<Vec<_>>(),
                ["65532"; 4],
                "{uid}"
            );
            assert_eq!(
                gid.split_whitespace().skip(1).collect::<Vec<_>>(),
                ["65532"; 4],
                "{gid}"
            );
            // A write at the container's root, through the kernel's view of its mount namespace.
            let probe = format!("/proc/{pid}/root/write-probe");
            let err = std::fs::write(&probe, b"x").expect_err("the root filesystem accepted a write");
            assert_eq!(err.raw_os_error(), Some(libc::EROFS), "writing {probe}: {err}");
            // The binary is the one the image was built with, at the Dockerfile's path.
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
            assert!(exe.ends_with("capy-webhooks"), "{}", exe.display());
        }
        // In-cluster configuration and the downward API: each replica holds a membership Lease
        // named after its pod, advertising its pod IP.
        let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
        for pod in &pods {
            let ip = pod.status.as_ref().unwrap().pod_ip.clone().unwrap();
            let lease = support::wait_for("a membership Lease per pod", Duration::from_secs(30), || async {
                leases
                    .get_opt(&format!("capy-webhooks-replica-{}", name(pod)))
                    .await
                    .ok()
                    .flatten()
            })
            .await;
            let annotations = lease.metadata.annotations.unwrap_or_default();
            assert!(
                annotations.values().any(|v| v.starts_with(&format!("{ip}:"))),
                "the membership Lease of {} does not advertise {ip}: {annotations:?}",
                name(pod)
            );
        }
    });
    state.ingest_token = kubectl(&[
        "-n",
        NS,
        "get",
        "secret",
        "capy-webhooks-ingest-token",
        "-o",
        "jsonpath={.data.token}",
    ]);
    state.ingest_token = String::from_utf8(base64_decode(&state.ingest_token)).unwrap();
    state.secrets.push(state.ingest_token.clone());
    let ip = host_ip();
    state.receiver = Some(state.rt.block_on(Receiver::start_on(ip, vec![])));
    state.installed = true;
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .expect("base64")
}

/// The commands of the README's block marked `<!-- pods-test: readme-path -->`.
fn readme_block() -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let marker = "<!-- pods-test: readme-path -->";
    let after = readme.split_once(marker).expect("the README marks its user path").1;
    let block = after.split_once("```sh\n").expect("a sh block after the marker").1;
    block.split_once("\n```").expect("the block ends").0.to_string()
}

/// 2. The README's user path, verbatim, on the pods: an API key from `kubectl exec`, REST through
///    `kubectl port-forward` to the Service, an event through the ingest Service, a delivery to a
///    receiver on the host whose signature verifies.
fn readme_path(state: &mut State) {
    require_install(state);
    let receiver = state.rt.block_on(async {
        // The README's receiver address: port 9000 on the address pods reach the host at.
        Receiver::start_on_port(host_ip(), 9000, vec![]).await
    });
    let script = readme_block();
    let bin = support::bin_dir();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut child = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(format!("{script}\necho \"KEY=$KEY\"\necho \"TOKEN=$TOKEN\""))
        .current_dir(root())
        .env("KUBECONFIG", support::kubeconfig_path())
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("bash");
    let out = wait_child(&mut child, Duration::from_secs(120));
    let stdout = ok("the README's user path", out);
    let created: Value = stdout
        .lines()
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(|v| v.get("plaintext_secret").is_some())
        })
        .unwrap_or_else(|| panic!("the README's create printed no endpoint:\n{stdout}"));
    let secret = created["plaintext_secret"].as_str().unwrap().to_string();
    for line in stdout.lines() {
        if let Some(v) = line.strip_prefix("KEY=").or_else(|| line.strip_prefix("TOKEN=")) {
            state.secrets.push(v.to_string());
        }
    }
    state.secrets.push(secret.clone());
    let delivered = state.rt.block_on(support::wait_for(
        "the README's event at the receiver",
        Duration::from_secs(30),
        || async { receiver.received().into_iter().find(|r| r.path == "/hook") },
    ));
    standardwebhooks::Webhook::new(&secret)
        .unwrap()
        .verify(&delivered.body, &delivered.headers)
        .expect("the README's delivery verifies with the secret the create returned");
    assert_eq!(delivered.json()["type"], "order.created");
}

fn wait_child(child: &mut Child, within: Duration) -> Output {
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() || started.elapsed() > within {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // What the script left in the background (port-forwards) holds its pipes open.
    kill_group(child);
    let mut stdout = String::new();
    let mut stderr = String::new();
    use std::io::Read;
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut stdout);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut stderr);
    }
    Output {
        status: child.wait().unwrap(),
        stdout: stdout.into_bytes(),
        stderr: stderr.into_bytes(),
    }
}

fn kill_group(child: &Child) {
    unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) };
}

/// Waits until both Services route to `n` ready pods: the EndpointSlices list them, and a
/// connection to each Service IP (kube-proxy's rules) succeeds.
async fn wait_serving(client: &Client, n: usize) -> (String, String) {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    for svc in [RELEASE.to_string(), format!("{RELEASE}-ingest")] {
        support::wait_for(
            &format!("{n} ready endpoints of Service {svc}"),
            Duration::from_secs(60),
            || async {
                let list = slices
                    .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={svc}")))
                    .await
                    .ok()?;
                let ready = list
                    .items
                    .iter()
                    .flat_map(|s| s.endpoints.iter())
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                    .count();
                (ready == n).then_some(())
            },
        )
        .await;
    }
    let (rest, ingest) = service_urls(client).await;
    for url in [&rest, &ingest] {
        let addr = url.trim_start_matches("http://").to_string();
        support::wait_for(&format!("a connection to {addr}"), Duration::from_secs(30), || async {
            tokio::net::TcpStream::connect(&addr).await.ok()
        })
        .await;
    }
    (rest, ingest)
}

/// Keys for the load's organizations and one endpoint each (once).
fn load_endpoints(state: &mut State) -> (String, String) {
    let (rest, ingest) = state.rt.block_on(async {
        let client = support::client().await;
        wait_settled(&client, 2, Duration::from_secs(120)).await;
        wait_serving(&client, 2).await
    });
    for org in LOAD_ORGS {
        if state.keys.contains_key(org) {
            continue;
        }
        let key = mint_key(org);
        state.secrets.push(key.clone());
        state.keys.insert(org.to_string(), key);
        add_endpoint(state, &rest, org, &format!("/load/{org}"));
    }
    (rest, ingest)
}

/// 3. `helm upgrade` to a new image tag under 100 events/s: never fewer than two Ready pods, never
///    more than three, one new pod at a time; every accepted event delivered.
fn rolling_upgrade(state: &mut State) {
    require_install(state);
    let (_rest, ingest) = load_endpoints(state);
    // The same image under a new tag: the pod template changes, so the Deployment rolls.
    ok(
        "ctr images tag",
        node_sh(&[
            "ctr",
            "images",
            "tag",
            "--force",
            "docker.io/library/capy-webhooks:dev",
            "docker.io/library/capy-webhooks:dev2",
        ]),
    );
    let http = reqwest::Client::new();
    let load = Arc::new(Mutex::new(Load::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let (min_ready, max_pods, seen) = state.rt.block_on(async {
        let client = support::client().await;
        let producer = spawn_load(&http, &ingest, &state.ingest_token, &state.seq, &stop, &load);
        // Watch the rollout from beside it.
        let watching = Arc::new(AtomicBool::new(true));
        let watcher = {
            let (client, watching) = (client.clone(), watching.clone());
            tokio::spawn(async move {
                let (mut min_ready, mut max_pods, mut seen) = (usize::MAX, 0, BTreeSet::new());
                while watching.load(Ordering::SeqCst) {
                    let pods = release_pods(&client).await;
                    let live: Vec<_> = pods.iter().filter(|p| !terminating(p)).collect();
                    min_ready = min_ready.min(live.iter().filter(|p| is_ready(p)).count());
                    max_pods = max_pods.max(live.len());
                    seen.extend(pods.iter().map(name));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                (min_ready, max_pods, seen)
            })
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        let took = tokio::task::spawn_blocking(|| deploy(&["--set", "image.tag=dev2"]))
            .await
            .unwrap();
        eprintln!("[pods] helm upgrade rolled out in {:.1}s", took.as_secs_f64());
        let pods = wait_settled(&client, 2, Duration::from_secs(120)).await;
        for pod in &pods {
            let image = pod.spec.as_ref().unwrap().containers[0].image.clone().unwrap();
            assert_eq!(image, "capy-webhooks:dev2", "{} still runs {image}", name(pod));
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::SeqCst);
        producer.await.unwrap();
        watching.store(false, Ordering::SeqCst);
        watcher.await.unwrap()
    });
    let load = load.lock().unwrap();
    assert!(
        load.other.is_empty(),
        "answers other than 202/503: {:?}",
        &load.other[..load.other.len().min(5)]
    );
    state
        .rt
        .block_on(wait_all_delivered(state, &load, Duration::from_secs(90)));
    eprintln!(
        "[pods] rolling upgrade under {EVENTS_PER_SECOND} events/s: {} accepted, 0 lost, {} answered 503, \
         {} connection errors retried, ingest p99 {:.1} ms; pods seen {seen:?}",
        load.accepted.len(),
        load.unavailable,
        load.connection_errors,
        p99(&load.latencies).as_secs_f64() * 1000.0
    );
    assert!(
        min_ready >= 2,
        "only {min_ready} Ready pods at one point: maxUnavailable 0 was not kept"
    );
    assert!(max_pods <= 3, "{max_pods} pods at once: maxSurge 1 was not kept");
    assert_eq!(seen.len(), 4, "two old pods replaced by two new ones: {seen:?}");
    assert!(
        load.accepted.len() >= 500,
        "only {} events accepted",
        load.accepted.len()
    );
}

/// 4. `kubectl delete pod` of the replica owning the busy organization's shard, under load: every
///    accepted event delivered; an event sent after the delete delivered within the Lease
///    duration + 5 s.
fn delete_shard_owner(state: &mut State) {
    require_install(state);
    let (_rest, ingest) = load_endpoints(state);
    let busy = LOAD_ORGS[0];
    let shard = capy_webhooks::shards::shard_of(busy);
    let lease_name = capy_webhooks::shards::shard_lease_name(shard);
    let http = reqwest::Client::new();
    let load = Arc::new(Mutex::new(Load::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let (deleted_at, owner) = state.rt.block_on(async {
        let client = support::client().await;
        wait_settled(&client, 2, Duration::from_secs(60)).await;
        let producer = spawn_load(&http, &ingest, &state.ingest_token, &state.seq, &stop, &load);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
        let owner = leases
            .get(&lease_name)
            .await
            .expect("the busy organization's shard Lease")
            .spec
            .and_then(|s| s.holder_identity)
            .expect("a holder");
        let deleted_at = Instant::now();
        let out = tokio::task::spawn_blocking({
            let owner = owner.clone();
            move || support::kubectl(&["-n", NS, "delete", "pod", &owner, "--wait=false"])
        })
        .await
        .unwrap();
        ok("kubectl delete pod", out);
        wait_settled(&client, 2, Duration::from_secs(120)).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::SeqCst);
        producer.await.unwrap();
        (deleted_at, owner)
    });
    let load = load.lock().unwrap();
    assert!(
        load.other.is_empty(),
        "answers other than 202/503: {:?}",
        &load.other[..load.other.len().min(5)]
    );
    let got = state
        .rt
        .block_on(wait_all_delivered(state, &load, Duration::from_secs(90)));
    let resumed = load
        .accepted
        .iter()
        .filter(|(org, _, sent)| org == busy && *sent > deleted_at)
        .filter_map(|(org, seq, _)| got.get(&(org.clone(), *seq)))
        .min()
        .map(|at| at.duration_since(deleted_at))
        .expect("events of the busy organization sent after the delete");
    // The longest stretch without a delivery for the busy organization, from the delete on.
    let mut arrivals: Vec<Instant> = got
        .iter()
        .filter(|((org, _), at)| org == busy && **at > deleted_at)
        .map(|(_, at)| *at)
        .collect();
    arrivals.push(deleted_at);
    arrivals.sort();
    let longest_pause = arrivals.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    eprintln!(
        "[pods] deleted {owner} (shard {shard} of {busy}): first delivery of an event sent after the \
         delete {:.1}s later, longest pause in its deliveries {:.1}s; {} accepted, 0 lost, {} answered 503",
        resumed.as_secs_f64(),
        longest_pause.as_secs_f64(),
        load.accepted.len(),
        load.unavailable
    );
    assert!(
        resumed <= LEASE_DURATION + Duration::from_secs(5),
        "deliveries resumed only after {resumed:?}"
    );
    assert!(
        longest_pause <= LEASE_DURATION + Duration::from_secs(5),
        "the busy organization's deliveries stopped for {longest_pause:?}"
    );
}

/// 5. The Eviction API, as `kubectl drain` uses it: the node cordoned, the first eviction is
///    allowed; a second, while the first pod cannot be replaced, is refused by the PDB, and one
///    replica keeps serving. Uncordoned, the Deployment is back to two.
fn evictions(state: &mut State) {
    require_install(state);
    state.rt.block_on(async {
        let client = support::client().await;
        let pods = wait_settled(&client, 2, Duration::from_secs(120)).await;
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), NS);
        support::wait_for("the PDB to allow one disruption", Duration::from_secs(60), || async {
            let pdb = pdbs.get(RELEASE).await.ok()?;
            let s = pdb.status?;
            (s.disruptions_allowed == 1 && s.current_healthy == 2).then_some(())
        })
        .await;
        // Without this, our replacement pod is Ready in about 2 s, and the API server, which
        // retries an eviction that meets a PDB update, lets the second one through once the
        // budget is whole again: correct, but not what this checks.
        ok("kubectl cordon", support::kubectl(&["cordon", "capy-node"]));
        // kube's client retries 429 answers with backoff, which would hide the refusal for
        // minutes: evictions go through a client that reports every answer as it comes.
        let evicting = client_without_retries().await;
        let first = evict(&evicting, &name(&pods[0])).await;
        let second = evict(&evicting, &name(&pods[1])).await;
        let kept: Api<Pod> = Api::namespaced(client.clone(), NS);
        let kept = kept.get_opt(&name(&pods[1])).await.unwrap();
        ok("kubectl uncordon", support::kubectl(&["uncordon", "capy-node"]));
        assert!(
            kept.as_ref().is_some_and(|p| is_ready(p) && !terminating(p)),
            "the PDB did not keep {} serving",
            name(&pods[1])
        );
        first.unwrap_or_else(|e| panic!("the first eviction was refused: {e}"));
        match second {
            Err(kube::Error::Api(ae)) if ae.code == 429 => {
                eprintln!("[pods] second eviction refused: {}", ae.message)
            }
            other => panic!("the second eviction was not refused by the PDB: {other:?}"),
        }
        // Back to two Ready replicas, and the PDB allows one disruption again.
        wait_settled(&client, 2, Duration::from_secs(120)).await;
        // The Deployment's status follows the pods' by a moment.
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
        support::wait_for(
            "the Deployment to report 2 available replicas",
            Duration::from_secs(30),
            || async {
                let d = deployments.get(RELEASE).await.ok()?;
                (d.status.and_then(|s| s.available_replicas) == Some(2)).then_some(())
            },
        )
        .await;
    });
}

async fn client_without_retries() -> Client {
    let path = support::kubeconfig_path();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.default_retry = false;
    Client::try_from(config).unwrap()
}

/// A policy/v1 Eviction, the body `kubectl drain` sends.
async fn evict(client: &Client, pod: &str) -> Result<Value, kube::Error> {
    let body = json!({
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": pod, "namespace": NS},
    });
    let req = warp::http::Request::post(format!("/api/v1/namespaces/{NS}/pods/{pod}/eviction"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).unwrap())
        .unwrap();
    client.request::<Value>(req).await
}

/// 6. `kubectl logs`: every line a JSON object, and no secret handed out during these tests
///    (signing secrets, API keys, the ingest token) in any of them, after a create, a rotation
///    and deliveries on the current pods.
fn logs(state: &mut State) {
    require_install(state);
    let (rest, _ingest) = load_endpoints(state);
    let org = LOAD_ORGS[1];
    let id = add_endpoint(state, &rest, org, "/logs");
    let key = state.keys[org].clone();
    let rotated: Value = state.rt.block_on(async {
        let r = reqwest::Client::new()
            .post(format!(
                "{rest}/v1/organizations/{org}/webhook-endpoints/{id}/rotate-secret"
            ))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    });
    state
        .secrets
        .push(rotated["plaintext_secret"].as_str().unwrap().to_string());
    let pods = state
        .rt
        .block_on(async { release_pods(&support::client().await).await });
    let mut lines = 0;
    for pod in &pods {
        let text = kubectl(&["-n", NS, "logs", &name(pod)]);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            lines += 1;
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            assert!(v.is_object() && v["level"].is_string(), "not a log record: {line}");
            for secret in &state.secrets {
                // A signing secret's key material too, without its whsec_ prefix.
                let material = secret.trim_start_matches("whsec_");
                assert!(
                    !line.contains(secret.as_str()) && !line.contains(material),
                    "a secret in the log of {}: {line}",
                    name(pod)
                );
            }
        }
    }
    assert!(lines > 10, "only {lines} log lines");
    eprintln!(
        "[pods] {lines} JSON log lines checked against {} secrets",
        state.secrets.len()
    );
}

/// 7. `hack/node.sh down` (what `make node-down` runs) leaves the host as it was before the node.
fn node_down(state: &mut State) {
    let before = state
        .before
        .take()
        .expect("the host state before the node (first phase)");
    state.receiver = None;
    ok("hack/node.sh down", node_sh(&["down"]));
    let after = host_state();
    let appeared: Vec<_> = after.difference(&before).collect();
    let vanished: Vec<_> = before.difference(&after).collect();
    assert!(
        appeared.is_empty() && vanished.is_empty(),
        "the host differs after node-down:\n  left behind: {appeared:#?}\n  gone: {vanished:#?}"
    );
}
