//! Shared support for the integration tests: one real control plane per test binary.
//!
//! Include with `mod support;`. The first test that needs the cluster starts it with
//! `hack/cluster.sh up DIR --watch-pid <this process>`; every other test of the binary shares it.
//! The cluster's watchdog tears it down (and removes DIR) once the test process has exited, so
//! nothing is left behind even though statics are never dropped.
//!
//! If `KUBECONFIG` is set, that cluster is used instead and nothing is started.
//!
//! Each `#[tokio::test]` runs on its own runtime and a `kube::Client` is bound to the runtime it was
//! made in, so start-up here is synchronous and clients are made per test with [`client`].
#![allow(dead_code)]

pub mod harness;
pub mod operator;
pub mod process;
pub mod receiver;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, Config};

/// Field manager used for everything the tests apply.
pub const FIELD_MANAGER: &str = "capy-webhooks-tests";
/// Path of the CRD manifest, relative to the crate root.
pub const CRD_FILE: &str = "crds/webhookendpoints.webhooks.capydb.io.yaml";
/// The WebhookEventType CRD (the event-type catalog), as generated into `crds/`.
pub const EVENT_TYPE_CRD_FILE: &str = "crds/webhookeventtypes.webhooks.capydb.io.yaml";

struct Cluster {
    kubeconfig: PathBuf,
    /// `Some` when this process started the control plane (in this directory).
    dir: Option<PathBuf>,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
/// etcd's `--quota-backend-bytes` for the control plane this binary starts (see [`use_etcd_quota`]).
static ETCD_QUOTA: OnceLock<u64> = OnceLock::new();
static BIN_DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn cluster_script() -> PathBuf {
    manifest_dir().join("hack/cluster.sh")
}

fn cluster() -> &'static Cluster {
    match CLUSTER.get_or_init(start_cluster) {
        Ok(c) => c,
        // Stored, so a failed start-up is reported by every test instead of retried by each.
        Err(e) => panic!("{e}"),
    }
}

fn start_cluster() -> Result<Cluster, String> {
    if let Some(kc) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        // A KUBECONFIG list: use its first file.
        let first = std::env::split_paths(&kc).next().unwrap_or_default();
        return Ok(Cluster {
            kubeconfig: first,
            dir: None,
        });
    }
    let dir = std::env::temp_dir().join(format!("capy-cp-{}-{:08x}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    eprintln!("[support] starting a local control plane in {}", dir.display());
    let mut up = Command::new(cluster_script());
    if let Some(quota) = ETCD_QUOTA.get() {
        up.env("CAPY_CLUSTER_ETCD_QUOTA_BYTES", quota.to_string());
    }
    let out = up
        .arg("up")
        .arg(&dir)
        .arg("--watch-pid")
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", cluster_script().display()))?;
    if !out.status.success() {
        // `up` has already stopped whatever it started; remove the directory if it is still there.
        let _ = Command::new(cluster_script()).arg("down").arg(&dir).status();
        return Err(format!(
            "`hack/cluster.sh up {}` failed ({}); its progress and the failing component's log \
             tail are on stderr above (run with --nocapture if hidden). To reproduce by hand: \
             hack/cluster.sh up /tmp/capy-cp-debug",
            dir.display(),
            out.status
        ));
    }
    Ok(Cluster {
        kubeconfig: dir.join("kubeconfig"),
        dir: Some(dir),
    })
}

/// Starts this binary's control plane with an etcd quota of `bytes` (`--quota-backend-bytes`).
/// Call it before anything touches the cluster; false when that is too late, or when
/// `KUBECONFIG` names a cluster this process does not start.
pub fn use_etcd_quota(bytes: u64) -> bool {
    ETCD_QUOTA.set(bytes).is_ok() && CLUSTER.get().is_none() && !external_cluster()
}

/// Whether `KUBECONFIG` names a cluster this process does not start.
pub fn external_cluster() -> bool {
    std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty())
}

/// etcd's client URL, when this process started the control plane.
pub fn etcd_url() -> Option<String> {
    let dir = cluster_dir()?;
    std::fs::read_to_string(dir.join("etcd.url"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The kubeconfig of the shared cluster (starting it if needed).
pub fn kubeconfig_path() -> PathBuf {
    cluster().kubeconfig.clone()
}

/// The directory of the cluster this process started (logs: `<dir>/<component>.log`), if any.
pub fn cluster_dir() -> Option<PathBuf> {
    cluster().dir.clone()
}

/// A fresh client for the shared cluster. Make one per test: clients are bound to their runtime.
pub async fn client() -> Client {
    let path = kubeconfig_path();
    let kubeconfig =
        Kubeconfig::read_from(&path).unwrap_or_else(|e| panic!("cannot read kubeconfig {}: {e}", path.display()));
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("invalid kubeconfig {}: {e}", path.display()));
    Client::try_from(config).unwrap_or_else(|e| panic!("cannot build a kube client: {e}"))
}

/// The directory holding kubectl, helm, kube-apiserver, etcd (built on first use).
pub fn bin_dir() -> PathBuf {
    let r = BIN_DIR.get_or_init(|| {
        let out = Command::new(cluster_script())
            .arg("bin-dir")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", cluster_script().display()))?;
        if !out.status.success() {
            return Err(format!("`hack/cluster.sh bin-dir` failed ({})", out.status));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or("").trim();
        if last.is_empty() {
            return Err("`hack/cluster.sh bin-dir` printed nothing".into());
        }
        Ok(PathBuf::from(last))
    });
    match r {
        Ok(p) => p.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// stdout of a successful command; panics with its stderr otherwise.
pub fn ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the bundled kubectl against the shared cluster.
pub fn kubectl(args: &[&str]) -> Output {
    let kubeconfig = kubeconfig_path();
    Command::new(bin_dir().join("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run kubectl")
}

/// Runs the bundled helm against the shared cluster.
pub fn helm(args: &[&str]) -> Output {
    let kubeconfig = kubeconfig_path();
    Command::new(bin_dir().join("helm"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run helm")
}

/// Creates a fresh namespace `<prefix>-<random>` and returns its name.
pub async fn test_namespace(client: &Client, prefix: &str) -> String {
    let mut base: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    base.truncate(50);
    let base = base.trim_matches('-');
    let base = if base.is_empty() { "test" } else { base };
    let name = format!("{base}-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("cannot create namespace {name}: {e}"));
    name
}

/// Best-effort namespace deletion (the whole cluster goes away with the test process anyway).
pub async fn delete_namespace(client: &Client, name: &str) {
    let _ = Api::<Namespace>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await;
}

/// Polls `f` every 100 ms until it returns `Some`; panics after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Name of the quota [`block_configmap_creates`] makes.
const CONFIGMAP_BLOCK: &str = "block-configmaps";

/// Makes the API server refuse every ConfigMap create in `ns` (403, exceeded quota) until
/// [`unblock_configmap_creates`]: a quota reported as used up (no quota controller runs here to
/// correct it). Returns once a probe create is refused (quota admission reads from a cache).
pub async fn block_configmap_creates(client: &Client, ns: &str) {
    use k8s_openapi::api::core::v1::ResourceQuota;
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), ns);
    let quota: ResourceQuota = serde_json::from_value(serde_json::json!({
        "metadata": {"name": CONFIGMAP_BLOCK},
        "spec": {"hard": {"count/configmaps": "10"}},
    }))
    .unwrap();
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    let used = serde_json::json!({"status": {"hard": {"count/configmaps": "10"}, "used": {"count/configmaps": "10"}}});
    quotas
        .patch_status(CONFIGMAP_BLOCK, &PatchParams::default(), &Patch::Merge(&used))
        .await
        .unwrap();
    wait_for("ConfigMap creates refused", Duration::from_secs(30), || async {
        match probe_configmap_create(client, ns).await {
            Err(kube::Error::Api(status)) if status.code == 403 => Some(()),
            _ => None,
        }
    })
    .await;
}

/// Creates and deletes a throw-away ConfigMap in `ns`: whether creates are accepted.
async fn probe_configmap_create(client: &Client, ns: &str) -> Result<(), kube::Error> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let probe: ConfigMap = serde_json::from_value(serde_json::json!({"metadata": {"name": "quota-probe"}})).unwrap();
    configmaps.create(&PostParams::default(), &probe).await?;
    let _ = configmaps.delete("quota-probe", &DeleteParams::default()).await;
    Ok(())
}

/// Ends [`block_configmap_creates`]; returns once a probe create is accepted again.
pub async fn unblock_configmap_creates(client: &Client, ns: &str) {
    use k8s_openapi::api::core::v1::ResourceQuota;
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), ns);
    quotas.delete(CONFIGMAP_BLOCK, &DeleteParams::default()).await.unwrap();
    wait_for("ConfigMap creates accepted", Duration::from_secs(30), || async {
        probe_configmap_create(client, ns).await.ok()
    })
    .await;
}

/// Server-side applies the CRDs (WebhookEndpoint, WebhookEventType) and waits until each is
/// established and its served versions are in discovery. Idempotent: call it from every test that
/// needs it.
pub async fn install_crd(client: &Client) {
    for file in [CRD_FILE, EVENT_TYPE_CRD_FILE] {
        install_crd_file(client, file).await;
    }
}

async fn install_crd_file(client: &Client, file: &str) {
    let path = manifest_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not a CustomResourceDefinition: {e}", path.display()));
    let name = crd.metadata.name.clone().expect("the CRD has no metadata.name");
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd))
        .await
        .unwrap_or_else(|e| panic!("cannot apply CRD {name}: {e}"));
    let timeout = Duration::from_secs(30);
    tokio::time::timeout(timeout, await_condition(api, &name, conditions::is_crd_established()))
        .await
        .unwrap_or_else(|_| panic!("timed out after {timeout:?} waiting for CRD {name} to be established"))
        .unwrap_or_else(|e| panic!("watching CRD {name}: {e}"));
    // Established normally implies served, but make sure discovery agrees before tests use it.
    let group = &crd.spec.group;
    let plural = &crd.spec.names.plural;
    for version in crd.spec.versions.iter().filter(|v| v.served) {
        let gv = format!("{group}/{}", version.name);
        wait_for(&format!("{plural} in discovery of {gv}"), timeout, || async {
            match client.list_api_group_resources(&gv).await {
                Ok(list) if list.resources.iter().any(|r| &r.name == plural) => Some(()),
                _ => None,
            }
        })
        .await;
    }
}

/// Validates a response body against a schema of the served OpenAPI document.
pub fn assert_conforms(schema: &str, value: &serde_json::Value) {
    let doc = capy_webhooks::api::openapi::document();
    let root = serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": format!("#/components/schemas/{schema}"),
        "components": doc["components"],
    });
    let validator = jsonschema::validator_for(&root).expect("OpenAPI schemas compile");
    let errors: Vec<String> = validator.iter_errors(value).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{schema} does not conform: {errors:?}\n{value:#}");
}

/// The Python with PyNaCl that verifies `v1a` (ed25519) signatures: `CAPY_VERIFIER_PYTHON` (set by
/// `make test`), else what `hack/verifier-tools.sh` installs (once, cached) and prints.
fn verifier_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        if let Some(python) = std::env::var_os("CAPY_VERIFIER_PYTHON") {
            return PathBuf::from(python);
        }
        let out = Command::new(manifest_dir().join("hack/verifier-tools.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("hack/verifier-tools.sh runs");
        assert!(out.status.success(), "hack/verifier-tools.sh failed");
        PathBuf::from(String::from_utf8(out.stdout).expect("a path").trim())
    })
}

/// Verifies the `v1a` signatures of a received delivery with PyNaCl (libsodium, an ed25519 this
/// project did not write) and the `whpk_` public key, as a receiver would: `Ok` when one
/// verifies over `{webhook-id}.{webhook-timestamp}.{body}`.
pub fn verify_v1a(public_key: &str, received: &receiver::Received) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new(verifier_python())
        .arg(manifest_dir().join("tests/support/verify_v1a.py"))
        .args([
            public_key,
            received.header("webhook-id"),
            received.header("webhook-timestamp"),
            received.header("webhook-signature"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the verifier starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&received.body)
        .expect("the body reaches the verifier");
    let out = child.wait_with_output().expect("the verifier ends");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}
