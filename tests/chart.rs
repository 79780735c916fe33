//! The Helm chart against a real control plane and real Helm: lint, server-side dry runs of the
//! rendered manifests, install, least-privilege RBAC (the operator binary and the api-key CLI run
//! as the chart's ServiceAccount through kubeconfig impersonation), what that identity may NOT do,
//! and CRD updates through `helm upgrade`.
//!
//! The CRD is cluster-scoped and only one release may own it: Helm refuses to adopt an object it
//! did not create. This binary has its own control plane and nothing in it applies the CRD except
//! Helm, so one shared release (installed once, with `crds.install=true`) owns it; the install,
//! RBAC and upgrade tests all use that release.

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use support::receiver::Receiver;

const RELEASE: &str = "capy-webhooks";
/// With the release named like the chart, every object is named `capy-webhooks[-suffix]`.
const FULLNAME: &str = "capy-webhooks";
const CRD_NAME: &str = "webhookendpoints.webhooks.capydb.io";
const ORG: &str = "org_chart";

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/capy-webhooks")
}

fn chart() -> String {
    chart_dir().display().to_string()
}

use support::ok;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn random_ns(prefix: &str) -> String {
    format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

fn sa_user(ns: &str) -> String {
    format!("system:serviceaccount:{ns}:{FULLNAME}")
}

static SHARED: OnceLock<String> = OnceLock::new();

/// Namespace of the shared release (installed on first use, with the CRD).
fn release_namespace() -> &'static str {
    SHARED.get_or_init(|| {
        let ns = random_ns("chart");
        ok(
            "helm install",
            support::helm(&[
                "install",
                RELEASE,
                &chart(),
                "--namespace",
                &ns,
                "--create-namespace",
                "--set",
                "crds.install=true",
                "--timeout",
                "120s",
            ]),
        );
        ok(
            "CRD established",
            support::kubectl(&[
                "wait",
                "--for=condition=Established",
                "--timeout=90s",
                &format!("crd/{CRD_NAME}"),
            ]),
        );
        // Discovery can lag behind Established in this control plane: wait until kubectl sees it.
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while !support::kubectl(&["get", "webhookendpoints", "-n", &ns])
            .status
            .success()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "webhookendpoints never appeared in discovery"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        ns
    })
}

#[test]
fn chart_copy_of_the_crd_matches_crds_dir() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, copy) in [
        (support::CRD_FILE, "files/crd.yaml"),
        (support::EVENT_TYPE_CRD_FILE, "files/crd-webhookeventtypes.yaml"),
    ] {
        let generated = std::fs::read_to_string(root.join(file)).unwrap();
        let copied = std::fs::read_to_string(chart_dir().join(copy)).unwrap();
        assert!(
            generated == copied,
            "charts/capy-webhooks/{copy} differs from {file}: run `make crds`"
        );
    }
}

/// `eventTypes` seeds the catalog: one WebhookEventType per item in the release's namespace,
/// named after its type (or `resourceName`), which the API server accepts (server-side dry run);
/// the CRD's CEL rule refuses a wildcard name. `strictEventTypes` renders the flag. The chart
/// identity reads the catalog at home and nowhere else, and cannot change it.
#[tokio::test]
async fn seeded_event_types_render_as_webhookeventtypes_readable_by_the_chart_identity() {
    let ns = release_namespace().to_string();
    ok(
        "event-type CRD established",
        support::kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=90s",
            "crd/webhookeventtypes.webhooks.capydb.io",
        ]),
    );
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(
        &values,
        r#"strictEventTypes: true
eventTypes:
  - name: database.backup.completed
    description: A backup of a database finished.
    group: database
    schema:
      type: object
      required: [database_id]
      properties:
        database_id: {type: string}
    example: {database_id: db_1}
  - name: legacy.export_done
    deprecated: true
  - name: user.created
    resourceName: users-created
"#,
    )
    .unwrap();
    let c = chart();
    let rendered = ok(
        "helm template with eventTypes",
        support::helm(&[
            "template",
            RELEASE,
            &c,
            "--namespace",
            &ns,
            "-f",
            values.to_str().unwrap(),
        ]),
    );
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
        .collect();
    let types: Vec<&serde_yaml::Value> = docs.iter().filter(|d| d["kind"] == "WebhookEventType").collect();
    let names: Vec<&str> = types.iter().map(|t| t["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["database.backup.completed", "legacy.export-done", "users-created"]
    );
    for t in &types {
        assert_eq!(t["apiVersion"], "webhooks.capydb.io/v1");
        assert_eq!(t["metadata"]["namespace"].as_str(), Some(ns.as_str()));
        assert!(t["spec"].get("resourceName").is_none(), "{t:?}");
    }
    assert_eq!(types[0]["spec"]["schema"]["required"][0], "database_id");
    assert_eq!(types[0]["spec"]["example"]["database_id"], "db_1");
    assert_eq!(types[1]["spec"]["deprecated"], true);
    assert_eq!(types[2]["spec"]["name"], "user.created");
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert!(
        serde_yaml::to_string(deployment)
            .unwrap()
            .contains("- --strict-event-types")
    );
    assert!(
        !serde_yaml::to_string(&rendered_deployment(&[]))
            .unwrap()
            .contains("strict-event-types")
    );
    // The CRD names the kind too: look at the documents' kinds.
    let default_kinds: Vec<String> = serde_yaml::Deserializer::from_str(&render(&ns, &[]))
        .filter_map(|doc| Some(serde_yaml::Value::deserialize(doc).ok()?["kind"].as_str()?.to_string()))
        .collect();
    assert!(
        !default_kinds.iter().any(|k| k == "WebhookEventType"),
        "no catalog by default: {default_kinds:?}"
    );

    // The API server takes them as rendered.
    let file = dir.path().join("types.yaml");
    let only_types: Vec<String> = types.iter().map(|t| serde_yaml::to_string(t).unwrap()).collect();
    std::fs::write(&file, only_types.join("---\n")).unwrap();
    let out = ok(
        "kubectl apply --dry-run=server of the seeded catalog",
        support::kubectl(&["apply", "--dry-run=server", "-n", &ns, "-f", file.to_str().unwrap()]),
    );
    assert_eq!(out.matches("webhookeventtype.webhooks.capydb.io/").count(), 3, "{out}");
    // The CEL rule on the name refuses a wildcard (the schema can't express it with a pattern the
    // operator does not share).
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: webhooks.capydb.io/v1\nkind: WebhookEventType\nmetadata:\n  name: wildcard\nspec:\n  name: database.*\n",
    )
    .unwrap();
    let out = support::kubectl(&["apply", "--dry-run=server", "-n", &ns, "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("name must be dot-separated segments"), "{stderr}");

    // RBAC: read at home, nowhere else, never write.
    let client = support::client().await;
    let other = support::test_namespace(&client, "chart-catalog").await;
    for verb in ["get", "list", "watch"] {
        assert!(
            can_i(&ns, &[verb, "webhookeventtypes.webhooks.capydb.io", "-n", &ns]),
            "{verb}"
        );
        assert!(
            !can_i(&ns, &[verb, "webhookeventtypes.webhooks.capydb.io", "-n", &other]),
            "{verb} elsewhere"
        );
    }
    for verb in ["create", "update", "patch", "delete"] {
        assert!(
            !can_i(&ns, &[verb, "webhookeventtypes.webhooks.capydb.io", "-n", &ns]),
            "{verb}"
        );
    }
    support::delete_namespace(&client, &other).await;
}

/// The chart's defaults are the binary's: the retry schedule is written once in the code, and
/// every duration value parses in the binary's one grammar.
#[test]
fn chart_defaults_match_the_binary() {
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap()).unwrap();
    assert_eq!(
        values["delivery"]["retrySchedule"].as_str(),
        Some(capy_webhooks::delivery::schedule::DEFAULT_SCHEDULE)
    );
    for value in [
        &values["delivery"]["connectTimeout"],
        &values["delivery"]["attemptTimeout"],
        &values["delivery"]["autoDisableAfter"],
        &values["rotationGracePeriod"],
        &values["http"]["headerTimeout"],
        &values["http"]["idleTimeout"],
    ] {
        let text = value.as_str().unwrap_or_else(|| panic!("{value:?} is a string"));
        capy_webhooks::duration::parse_duration(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    }
}

#[test]
fn helm_lint_strict() {
    ok("helm lint --strict", support::helm(&["lint", "--strict", &chart()]));
    // The schema refuses bad values.
    for bad in [
        "logFormat=xml",
        "components={api,bogus}",
        "delivery.retrySchedule=soon",
        "delivery.retrySchedule=1.5h",
        "rotationGracePeriod=1 day",
        "organizationLabelPolicy.enabled=maybe",
        "organizationLabelPolicy.validationActions={Deny,Warn}",
        "organizationLabelPolicy.validationActions={Refuse}",
        "tracing.samplingRatio=1.5",
        "tracing.enabled=true",
        "tracing.endpoint=collector:4318",
        "egressProxy.url=https://proxy.internal:3128",
        "egressProxy.url=proxy.internal:3128",
        "egressProxy.url=http://proxy.internal:3128/path",
    ] {
        let out = support::helm(&["lint", "--strict", &chart(), "--set", bad]);
        assert!(!out.status.success(), "helm lint accepted --set {bad}");
    }
}

fn render(ns: &str, sets: &[&str]) -> String {
    let mut args = vec!["template", RELEASE, "--namespace", ns];
    let c = chart();
    args.push(&c);
    for s in sets {
        args.extend(["--set", s]);
    }
    ok("helm template", support::helm(&args))
}

/// The chart's Deployment as rendered with `sets`.
fn rendered_deployment(sets: &[&str]) -> serde_yaml::Value {
    let rendered = render("capy-system", sets);
    serde_yaml::Deserializer::from_str(&rendered)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
        .find(|doc| doc["kind"] == "Deployment")
        .expect("a Deployment is rendered")
}

/// `operationalWebhook.*` renders the two flags and mounts the named Secret's key as the file the
/// flag names, read-only; the secret is in no argument and no environment variable. Off by
/// default, and refused half-configured.
#[test]
fn operational_webhook_values_render_the_flags_and_the_secret_file() {
    let sets = [
        "operationalWebhook.enabled=true",
        "operationalWebhook.url=https://platform.example.com/capy/operational",
        "operationalWebhook.existingSecret=platform-webhook",
        "operationalWebhook.secretKey=whsec",
    ];
    let deployment = rendered_deployment(&sets);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--operational-webhook-url=https://platform.example.com/capy/operational"));
    assert!(args.contains(&"--operational-webhook-secret-file=/etc/capy-webhooks/operational/secret"));
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "operational-webhook-secret")
        .expect("the secret's volume");
    assert_eq!(volume["secret"]["secretName"], "platform-webhook");
    assert_eq!(volume["secret"]["items"][0]["key"], "whsec");
    assert_eq!(volume["secret"]["items"][0]["path"], "secret");
    let mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "operational-webhook-secret")
        .expect("the secret's mount");
    assert_eq!(mount["mountPath"], "/etc/capy-webhooks/operational");
    assert_eq!(mount["readOnly"], true);
    let env = serde_yaml::to_string(&container["env"]).unwrap();
    assert!(
        !env.contains("platform-webhook") && !env.to_lowercase().contains("operational"),
        "{env}"
    );

    // Off by default: no flag, no volume.
    let default = serde_yaml::to_string(&rendered_deployment(&[])).unwrap();
    assert!(!default.contains("operational"), "{default}");
    // Half-configured is refused, naming what is missing.
    for missing in [&sets[..1], &sets[..2], &[sets[0], sets[2]][..]] {
        let mut args = vec!["template", RELEASE, "--namespace", "capy-system"];
        let c = chart();
        args.push(&c);
        for s in missing {
            args.extend(["--set", s]);
        }
        let out = support::helm(&args);
        assert!(!out.status.success(), "rendered with only {missing:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("operationalWebhook."));
    }
}

#[tokio::test]
async fn rendered_manifests_are_accepted_by_the_api_server() {
    let client = support::client().await;
    let ns = support::test_namespace(&client, "chart-dry").await;
    let variants: [&[&str]; 3] = [
        &[],
        &[
            "watchAllNamespaces=true",
            "networkPolicy.enabled=true",
            "networkPolicy.ingestFrom[0].namespaceSelector.matchLabels.capydb\\.io/tier=platform",
            "networkPolicy.ingestFrom[0].podSelector.matchLabels.app=capydb",
            "podDisruptionBudget.enabled=true",
            "egressProxy.url=http://proxy.internal:3128",
        ],
        &[
            "crds.install=false",
            "allowHttp=true",
            "allowPrivateTargets=true",
            "components={api,controller}",
            "clerk.jwksUrl=https://clerk.example.com/.well-known/jwks.json",
            "clerk.issuer=https://clerk.example.com",
            "clerk.authorizedParties={https://app.example.com}",
            "ingestToken.existingSecret=my-token",
            "tracing.enabled=true",
            "tracing.endpoint=http://otel-collector.observability:4318",
            "tracing.samplingRatio=0.25",
            "tracing.headersSecret=otlp-headers",
            "egressProxy.url=http://ignored.internal:3128",
            "egressProxy.existingSecret=egress-proxy",
            "egressProxy.existingSecretKey=proxy-url",
        ],
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, sets) in variants.iter().enumerate() {
        let rendered = render(&ns, sets);
        assert!(
            !rendered.contains("kind: ServiceMonitor"),
            "ServiceMonitor only when enabled"
        );
        let file = dir.path().join(format!("variant-{i}.yaml"));
        std::fs::write(&file, &rendered).unwrap();
        let out = ok(
            &format!("kubectl apply --dry-run=server of variant {i} ({sets:?})"),
            support::kubectl(&["apply", "--dry-run=server", "-n", &ns, "-f", file.to_str().unwrap()]),
        );
        for kind in ["deployment.apps/", "serviceaccount/", "service/"] {
            assert!(out.contains(kind), "variant {i}: no {kind} in {out}");
        }
        let has = |s: &str| out.contains(s);
        match i {
            0 => assert!(
                has("role.rbac")
                    && !has("clusterrole.rbac")
                    && has("customresourcedefinition")
                    && !has("validatingadmissionpolicy"),
                "{out}"
            ),
            1 => assert!(
                has("clusterrole.rbac")
                    && has("clusterrolebinding")
                    && has("networkpolicy")
                    && has("poddisruptionbudget")
                    && has("validatingadmissionpolicy.admissionregistration.k8s.io/")
                    && has("validatingadmissionpolicybinding.admissionregistration.k8s.io/"),
                "{out}"
            ),
            _ => assert!(!has("customresourcedefinition") && !has("secret/"), "{out}"),
        }
        if i == 1 {
            assert!(rendered.contains("--all-namespaces") && rendered.contains(&format!("--home-namespace={ns}")));
            assert!(
                rendered
                    .contains("name: CAPY_WEBHOOKS_EGRESS_PROXY\n              value: \"http://proxy.internal:3128\""),
                "{rendered}"
            );
        }
        if i == 0 {
            // Off by default.
            assert!(!rendered.contains("CAPY_WEBHOOKS_EGRESS_PROXY"));
        }
        if i == 2 {
            for flag in [
                "--allow-http",
                "--allow-private-targets",
                "--components=api,controller",
                "--clerk-issuer=",
                "--otlp-endpoint=http://otel-collector.observability:4318",
                "--trace-sampling-ratio=0.25",
                "name: OTEL_EXPORTER_OTLP_HEADERS",
                "name: otlp-headers",
                // The Secret wins over the plain URL, which is not rendered.
                "name: CAPY_WEBHOOKS_EGRESS_PROXY\n              valueFrom:\n                secretKeyRef:\n                  name: egress-proxy\n                  key: proxy-url",
            ] {
                assert!(rendered.contains(flag), "no {flag}");
            }
            assert!(!rendered.contains("ignored.internal"));
        } else {
            // Traces are off by default: no exporter flag, no headers.
            assert!(!rendered.contains("--otlp-endpoint") && !rendered.contains("OTEL_EXPORTER_OTLP"));
        }
    }
    // A ServiceMonitor is rendered only on request (its CRD is not in this cluster).
    assert!(render(&ns, &["serviceMonitor.enabled=true"]).contains("kind: ServiceMonitor"));
    support::delete_namespace(&client, &ns).await;
}

fn get_json(args: &[&str]) -> Value {
    serde_json::from_str(&ok(&format!("kubectl get {args:?}"), support::kubectl(args))).unwrap()
}

fn ingest_token(ns: &str) -> String {
    let secret = get_json(&[
        "get",
        "secret",
        &format!("{FULLNAME}-ingest-token"),
        "-n",
        ns,
        "-o",
        "json",
    ]);
    let b64 = secret["data"]["token"].as_str().expect("token key");
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap()
}

#[test]
fn helm_install_creates_the_release_objects() {
    let ns = release_namespace();
    for (kind, name) in [
        ("deployment", FULLNAME.to_string()),
        ("service", FULLNAME.to_string()),
        ("service", format!("{FULLNAME}-ingest")),
        ("service", format!("{FULLNAME}-metrics")),
        ("serviceaccount", FULLNAME.to_string()),
        ("role", FULLNAME.to_string()),
        ("rolebinding", FULLNAME.to_string()),
        ("secret", format!("{FULLNAME}-ingest-token")),
    ] {
        ok(
            &format!("{kind}/{name} exists"),
            support::kubectl(&["get", kind, &name, "-n", ns]),
        );
    }
    let token = ingest_token(ns);
    assert!(
        token.len() == 40 && token.chars().all(|c| c.is_ascii_alphanumeric()),
        "{token:?}"
    );

    let deploy = get_json(&["get", "deployment", FULLNAME, "-n", ns, "-o", "json"]);
    // Two replicas rolled one at a time, never below the replica count; a PDB keeps one up.
    assert_eq!(deploy["spec"]["replicas"], 2);
    assert_eq!(deploy["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let pdb = get_json(&["get", "poddisruptionbudget", FULLNAME, "-n", ns, "-o", "json"]);
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    let pod = &deploy["spec"]["template"]["spec"];
    let spread = &pod["topologySpreadConstraints"][0];
    assert_eq!(spread["whenUnsatisfiable"], "ScheduleAnyway", "soft spread: {spread}");
    let env: Vec<(&str, &str)> = pod["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?)))
        .collect();
    for want in [
        ("POD_NAME", "metadata.name"),
        ("POD_IP", "status.podIP"),
        ("POD_UID", "metadata.uid"),
    ] {
        assert!(env.contains(&want), "{want:?} from the downward API: {env:?}");
    }
    assert_eq!(pod["serviceAccountName"], FULLNAME);
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() > 20);
    let c = &pod["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "run");
    assert!(args.contains(&format!("--namespace={ns}").as_str()), "{args:?}");
    assert!(args.contains(&"--ingest-token-file=/etc/capy-webhooks/ingest-token"));
    assert!(args.contains(&"--log-format=json"));
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["runAsUser"], 65532);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    let crd = get_json(&["get", "crd", CRD_NAME, "-o", "json"]);
    assert_eq!(crd["metadata"]["annotations"]["meta.helm.sh/release-name"], RELEASE);
    assert_eq!(crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
    // Pods never start here (no kubelet): that is expected.
}

/// A kubeconfig like the admin's, whose user impersonates `user`.
fn impersonating_kubeconfig(dir: &Path, user: &str) -> PathBuf {
    let text = std::fs::read_to_string(support::kubeconfig_path()).unwrap();
    let mut kc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let users = kc["users"].as_sequence_mut().expect("users");
    for u in users {
        u["user"]["as"] = serde_yaml::Value::String(user.into());
    }
    let path = dir.join("impersonating.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&kc).unwrap()).unwrap();
    path
}

/// The operator binary as a child process; killed when dropped.
struct Running(Child);
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cli(kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_capy-webhooks"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[tokio::test]
async fn the_operator_works_with_only_the_chart_rbac() {
    let ns = release_namespace().to_string();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = impersonating_kubeconfig(dir.path(), &sa_user(&ns));

    // The api-key CLI as the ServiceAccount: create, list, revoke.
    let key = ok(
        "api-key create as the ServiceAccount",
        cli(
            &kubeconfig,
            &["api-key", "create", "--org", ORG, "--name", "chart", "--namespace", &ns],
        ),
    )
    .trim()
    .to_string();
    assert!(key.starts_with("capy_live_"), "{key}");
    ok(
        "api-key create (spare)",
        cli(
            &kubeconfig,
            &["api-key", "create", "--org", ORG, "--name", "spare", "--namespace", &ns],
        ),
    );
    let listed = ok(
        "api-key list",
        cli(&kubeconfig, &["api-key", "list", "--org", ORG, "--namespace", &ns]),
    );
    let spare_id = listed
        .lines()
        .find(|l| l.contains("spare"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("spare key not listed: {listed}"))
        .to_string();
    ok(
        "api-key revoke",
        cli(&kubeconfig, &["api-key", "revoke", &spare_id, "--namespace", &ns]),
    );

    // The operator, outside the cluster, as the ServiceAccount. The token comes from the chart.
    let token_file = dir.path().join("ingest-token");
    std::fs::write(&token_file, ingest_token(&ns)).unwrap();
    // Two replicas, as the chart runs them: they share the dispatch shards through Leases and
    // forward to each other, all with the chart's RBAC.
    let start_replica = |name: &str| {
        let (api, ingest, metrics) = (free_port(), free_port(), free_port());
        let log_path = dir.path().join(format!("{name}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_capy-webhooks"));
        cmd.args(["run", "--namespace", &ns])
            .args(["--api-listen", &format!("127.0.0.1:{api}")])
            .args(["--ingest-listen", &format!("127.0.0.1:{ingest}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
            .arg("--ingest-token-file")
            .arg(&token_file)
            .args(["--allow-http", "--allow-private-targets", "--summary-interval", "1s"])
            .args(["--lease-duration", "6s"]);
        let process = Running(
            cmd.env("KUBECONFIG", &kubeconfig)
                .env("RUST_LOG", "info")
                .env("POD_NAME", name)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log_path).unwrap())
                .spawn()
                .unwrap(),
        );
        (api, ingest, metrics, log_path, process)
    };
    let (api, ingest_a, metrics_a, log_a, _op_a) = start_replica("chart-test-a");
    let (api_b, ingest_b, metrics_b, log_b, _op_b) = start_replica("chart-test-b");
    let log = || {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!("{}\n--- second replica ---\n{}", read(&log_a), read(&log_b))
    };
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{api}/v1/organizations/{ORG}/webhook-endpoints");
    let up = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Ok(r) = http.get(&base).bearer_auth(&key).send().await
                && r.status() == 200
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        up.is_ok(),
        "REST API never answered 200 with the key; operator log:\n{}",
        log()
    );
    // Both hold shards; events and reads go through the replica that does not own ORG's.
    let shards = |metrics: u16| {
        let http = http.clone();
        async move {
            let body: Value = http
                .get(format!("http://127.0.0.1:{metrics}/readyz"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            serde_json::from_value::<Vec<u32>>(body["shards"].clone()).ok()
        }
    };
    let (shards_a, _) = support::wait_for(
        "the shards spread over both replicas",
        Duration::from_secs(60),
        || async {
            let (a, b) = (shards(metrics_a).await?, shards(metrics_b).await?);
            (!a.is_empty() && !b.is_empty() && a.len() + b.len() == 16).then_some((a, b))
        },
    )
    .await;
    let owner_is_a = shards_a.contains(&capy_webhooks::shards::shard_of(ORG));
    let (via_api, ingest) = if owner_is_a { (api_b, ingest_b) } else { (api, ingest_a) };
    let via_base = format!("http://127.0.0.1:{via_api}/v1/organizations/{ORG}/webhook-endpoints");
    let (has_metrics, metrics) = (true, metrics_a);

    let receiver = Receiver::start(vec![]).await;
    let res = http
        .post(&base)
        .bearer_auth(&key)
        .json(&json!({"url": receiver.url("/in"), "event_types": ["order.*"]}))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let created: Value = res.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 201, "{created}\noperator log:\n{}", log());
    assert!(created["plaintext_secret"].as_str().unwrap().starts_with("whsec_"));
    let id = created["webhook_endpoint"]["id"].as_str().unwrap().to_string();
    ok(
        "signing Secret exists",
        support::kubectl(&["get", "secret", &format!("{id}-signing"), "-n", &ns]),
    );

    let res = http
        .post(format!("http://127.0.0.1:{ingest}/v1/organizations/{ORG}/events"))
        .bearer_auth(std::fs::read_to_string(&token_file).unwrap())
        .json(&json!({"type": "order.created", "data": {"n": 1}}))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    assert_eq!((status, &body["deliveries"]), (202, &json!(1)), "{body}\n{}", log());
    support::wait_for("the receiver got the event", Duration::from_secs(30), || async {
        (!receiver.received().is_empty()).then_some(())
    })
    .await;
    assert_eq!(receiver.received()[0].json()["type"], "order.created");
    support::wait_for("the delivery is succeeded", Duration::from_secs(30), || async {
        let body: Value = http
            .get(format!("{via_base}/{id}/deliveries"))
            .bearer_auth(&key)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let list = body["deliveries"].as_array()?;
        (list.len() == 1 && list[0]["state"] == "succeeded").then_some(())
    })
    .await;
    // Events were published (events.k8s.io create).
    support::wait_for("a SecretCreated Event", Duration::from_secs(30), || async {
        let out = support::kubectl(&["get", "events.events.k8s.io", "-n", &ns, "-o", "json"]);
        String::from_utf8_lossy(&out.stdout)
            .contains("SecretCreated")
            .then_some(())
    })
    .await;
    if has_metrics {
        for path in ["/healthz", "/readyz"] {
            let r = http
                .get(format!("http://127.0.0.1:{metrics}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{path}");
        }
    }
    let res = http
        .delete(format!("{base}/{id}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "delete: {}", res.status());
    let log = log();
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "RBAC refusals in the operator log:\n{log}"
    );
}

fn can_i(ns: &str, args: &[&str]) -> bool {
    let user = sa_user(ns);
    let mut all = vec!["auth", "can-i"];
    all.extend(args);
    all.extend(["--as", &user]);
    let out = support::kubectl(&all);
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        answer == "yes" || answer == "no",
        "kubectl {all:?}: {answer:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    answer == "yes"
}

#[tokio::test]
async fn the_chart_identity_can_do_nothing_more() {
    let ns = release_namespace().to_string();
    let client = support::client().await;
    let other = support::test_namespace(&client, "chart-other").await;
    // What it needs, in its namespace.
    for args in [
        &["get", "secrets"][..],
        &["watch", "configmaps"],
        &["patch", "webhookendpoints.webhooks.capydb.io", "--subresource=status"],
        &[
            "update",
            "webhookendpoints.webhooks.capydb.io",
            "--subresource=finalizers",
        ],
        &["create", "events.events.k8s.io"],
        &["update", "leases.coordination.k8s.io"],
    ] {
        let mut a = args.to_vec();
        a.extend(["-n", &ns]);
        assert!(can_i(&ns, &a), "should be allowed: {a:?}");
    }
    // What it must not do.
    let refused: Vec<Vec<&str>> = vec![
        vec!["get", "secrets", "-n", &other],
        vec!["list", "configmaps", "-n", &other],
        vec!["list", "webhookendpoints.webhooks.capydb.io", "-n", &other],
        vec!["list", "secrets", "--all-namespaces"],
        vec!["list", "webhookendpoints.webhooks.capydb.io", "--all-namespaces"],
        vec!["create", "deployments.apps", "-n", &ns],
        vec!["create", "pods", "-n", &ns],
        vec!["create", "pods", "--subresource=exec", "-n", &ns],
        vec!["update", "secrets", "-n", &ns],
        vec!["create", "events", "-n", &other],
        vec!["get", "leases.coordination.k8s.io", "-n", &other],
        vec!["delete", "leases.coordination.k8s.io", "-n", &ns],
        vec!["create", "roles.rbac.authorization.k8s.io", "-n", &ns],
        vec!["get", "customresourcedefinitions"],
        vec!["update", "customresourcedefinitions"],
        vec!["delete", "customresourcedefinitions"],
        vec!["list", "namespaces"],
    ];
    for args in &refused {
        assert!(!can_i(&ns, args), "should be refused: {args:?}");
    }
    // And a real request with the impersonating kubeconfig is refused by the API server.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = impersonating_kubeconfig(dir.path(), &sa_user(&ns));
    let out = Command::new(support::bin_dir().join("kubectl"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["get", "secrets", "-n", &other])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"), "{out:?}");
    support::delete_namespace(&client, &other).await;
}

/// With every namespace served, the identity reads and applies signing Secrets everywhere (a
/// server-side apply that creates one is checked as create too), but deletes Secrets (revokes API
/// keys) only in its home namespace.
#[tokio::test]
async fn with_every_namespace_served_secrets_are_deleted_only_at_home() {
    let _crd = release_namespace();
    let client = support::client().await;
    let home = random_ns("chart-all");
    ok(
        "helm install (every namespace)",
        support::helm(&[
            "install",
            RELEASE,
            &chart(),
            "--namespace",
            &home,
            "--create-namespace",
            "--set",
            "watchAllNamespaces=true",
            "--set",
            "crds.install=false",
            "--timeout",
            "120s",
        ]),
    );
    let other = support::test_namespace(&client, "chart-all-other").await;
    for args in [
        vec!["create", "secrets", "-n", &home],
        vec!["delete", "secrets", "-n", &home],
        vec!["patch", "secrets", "-n", &other],
        vec!["get", "secrets", "-n", &other],
        vec!["list", "namespaces"],
        vec!["create", "configmaps", "-n", &other],
        vec!["create", "secrets", "-n", &other],
    ] {
        assert!(can_i(&home, &args), "should be allowed: {args:?}");
    }
    for args in [
        vec!["delete", "secrets", "-n", &other],
        vec!["update", "secrets", "-n", &other],
        vec!["patch", "namespaces"],
    ] {
        assert!(!can_i(&home, &args), "should be refused: {args:?}");
    }
    // The controller's write, as the identity: a server-side apply that creates a Secret.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = impersonating_kubeconfig(dir.path(), &sa_user(&home));
    let manifest = dir.path().join("secret.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: ep-signing\n  namespace: {other}\nstringData:\n  k: v\n"
        ),
    )
    .unwrap();
    let kubectl_as = |args: &[&str]| {
        Command::new(support::bin_dir().join("kubectl"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .output()
            .unwrap()
    };
    let applied = kubectl_as(&[
        "apply",
        "--server-side",
        "--field-manager=capy-webhooks",
        "-f",
        manifest.to_str().unwrap(),
    ]);
    assert!(applied.status.success(), "{applied:?}");
    let deleted = kubectl_as(&["delete", "secret", "ep-signing", "-n", &other]);
    assert!(
        !deleted.status.success() && String::from_utf8_lossy(&deleted.stderr).contains("forbidden"),
        "{deleted:?}"
    );
    ok(
        "helm uninstall",
        support::helm(&["uninstall", RELEASE, "--namespace", &home]),
    );
    support::delete_namespace(&client, &other).await;
    support::delete_namespace(&client, &home).await;
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn printer_columns() -> Vec<String> {
    let crd = get_json(&["get", "crd", CRD_NAME, "-o", "json"]);
    crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn helm_upgrade_updates_the_crd_and_keeps_the_ingest_token() {
    let ns = release_namespace().to_string();
    let token = ingest_token(&ns);
    // A copy of the chart whose CRD has one more printer column.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("capy-webhooks");
    copy_dir(&chart_dir(), &copy);
    let crd_file = copy.join("files/crd.yaml");
    let text = std::fs::read_to_string(&crd_file).unwrap();
    let marker = "  - additionalPrinterColumns:\n";
    assert!(text.contains(marker));
    let column = "    - description: Test column added by the upgrade test\n      jsonPath: .spec.description\n      \
                  name: ChartUpgradeProbe\n      priority: 1\n      type: string\n";
    std::fs::write(&crd_file, text.replacen(marker, &format!("{marker}{column}"), 1)).unwrap();

    let upgrade = |chart: &Path| {
        ok(
            "helm upgrade",
            support::helm(&[
                "upgrade",
                RELEASE,
                chart.to_str().unwrap(),
                "--namespace",
                &ns,
                "--set",
                "crds.install=true",
            ]),
        )
    };
    upgrade(&copy);
    let cols = printer_columns();
    assert!(cols.iter().any(|c| c == "ChartUpgradeProbe"), "{cols:?}");
    assert_eq!(ingest_token(&ns), token, "the ingest token survives an upgrade");
    // And back: the repository's chart removes the column again.
    upgrade(&chart_dir());
    let cols = printer_columns();
    assert!(!cols.iter().any(|c| c == "ChartUpgradeProbe"), "{cols:?}");
    assert_eq!(ingest_token(&ns), token);
    // The CRD still serves (endpoints can be listed).
    ok(
        "list endpoints",
        support::kubectl(&["get", "webhookendpoints", "-n", &ns]),
    );
}
