//! The chart's ValidatingAdmissionPolicy on the organization label, enforced by the real API
//! server: a Namespace labelled `webhooks.capydb.io/organization-id=O` serves organization O
//! (src/tenancy.rs), so only the identities the chart names may add, change or remove that label.
//!
//! The policy and its binding are rendered by the real Helm (`helm template`) and applied as
//! rendered; tenants and the allowed identities are impersonated (`kubectl --as --as-group`) and
//! granted RBAC on Namespaces, so every refusal seen here comes from the policy, not from RBAC.
//! A binary of its own, so a control plane of its own: the policy is cluster-wide, and
//! `tests/chart.rs` installs a release whose policy allows other identities than this test's.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_yaml::Value;
use support::ok;

const LABEL: &str = "webhooks.capydb.io/organization-id";
const POLICY_KINDS: [&str; 2] = ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"];

fn chart() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("charts/capy-webhooks")
        .display()
        .to_string()
}

/// The documents `helm template` renders for release `release` with `--set` values `sets`.
fn render(release: &str, sets: &[&str]) -> Vec<Value> {
    let c = chart();
    let mut args = vec!["template", release, &c, "--namespace", "capy-home"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let text = ok(&format!("helm template {sets:?}"), support::helm(&args));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("helm renders YAML"))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn policy_objects(docs: &[Value]) -> Vec<&Value> {
    docs.iter().filter(|d| POLICY_KINDS.contains(&kind(d))).collect()
}

/// The kinds the API server serves cluster-wide (its discovery).
fn cluster_scoped_kinds() -> Vec<String> {
    let out = ok(
        "kubectl api-resources",
        support::kubectl(&["api-resources", "--namespaced=false", "--no-headers"]),
    );
    out.lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect()
}

#[test]
fn the_policy_is_rendered_only_with_cluster_wide_scope_or_on_request() {
    let cluster_scoped = cluster_scoped_kinds();
    assert!(
        POLICY_KINDS.iter().all(|k| cluster_scoped.iter().any(|c| c == k)),
        "the API server serves no ValidatingAdmissionPolicy: {cluster_scoped:?}"
    );
    let scoped = |docs: &[Value]| -> Vec<String> {
        docs.iter()
            .map(|d| kind(d).to_string())
            .filter(|k| cluster_scoped.contains(k))
            .collect()
    };
    // The chart's default serves its own namespace: nothing cluster-wide but the CRDs
    // (WebhookEndpoint, WebhookEventType), which `crds.install` governs.
    assert_eq!(
        scoped(&render("scope", &[])),
        ["CustomResourceDefinition", "CustomResourceDefinition"]
    );
    assert_eq!(scoped(&render("scope", &["crds.install=false"])), Vec::<String>::new());
    // With every namespace served, the policy and its binding, named after the release.
    let docs = render("scope", &["watchAllNamespaces=true", "crds.install=false"]);
    let policy = policy_objects(&docs);
    assert_eq!(policy.len(), 2, "{policy:?}");
    for doc in &policy {
        assert_eq!(doc["metadata"]["name"], "scope-capy-webhooks-organization-label");
    }
    let binding = policy[1];
    assert_eq!(kind(binding), "ValidatingAdmissionPolicyBinding");
    assert_eq!(binding["spec"]["policyName"], "scope-capy-webhooks-organization-label");
    assert_eq!(
        binding["spec"]["validationActions"],
        serde_yaml::to_value(["Deny"]).unwrap()
    );
    // Explicit values win either way.
    let off = render(
        "scope",
        &["watchAllNamespaces=true", "organizationLabelPolicy.enabled=false"],
    );
    assert!(policy_objects(&off).is_empty());
    let on = render("scope", &["organizationLabelPolicy.enabled=true", "crds.install=false"]);
    assert_eq!(policy_objects(&on).len(), 2);
    assert_eq!(scoped(&on), POLICY_KINDS);
}

/// Who makes a request: the kubeconfig's own identity (a member of system:masters), or an
/// impersonated user in one group.
#[derive(Clone, Copy)]
enum Who<'a> {
    Admin,
    As { user: &'a str, group: &'a str },
}

fn kubectl_as(who: Who, args: &[&str]) -> Output {
    match who {
        Who::Admin => support::kubectl(args),
        Who::As { user, group } => {
            let (as_user, as_group) = (format!("--as={user}"), format!("--as-group={group}"));
            let mut all = vec![as_user.as_str(), as_group.as_str()];
            all.extend(args);
            support::kubectl(&all)
        }
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn labels(ns: &str) -> BTreeMap<String, String> {
    let out = ok(
        &format!("kubectl get namespace {ns}"),
        support::kubectl(&["get", "namespace", ns, "-o", "json"]),
    );
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    serde_json::from_value(json["metadata"]["labels"].clone()).unwrap_or_default()
}

fn organization(ns: &str) -> Option<String> {
    labels(ns).remove(LABEL)
}

/// Deletes what the test made cluster-wide, even when it fails half-way.
struct Cleanup(Vec<String>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut args = vec!["delete", "--ignore-not-found", "--wait=false"];
        args.extend(self.0.iter().map(String::as_str));
        let _ = support::kubectl(&args);
    }
}

#[test]
fn only_allowed_identities_add_change_or_remove_the_organization_label() {
    let id = format!("vap-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let policy = format!("{id}-capy-webhooks-organization-label");
    let (tenants, platform, bot) = (format!("{id}-tenants"), format!("{id}-platform"), format!("{id}-bot"));
    let (alice, carol) = (format!("{id}-alice"), format!("{id}-carol"));
    let tenant = Who::As {
        user: &alice,
        group: &tenants,
    };
    // Allowed through allowedGroups, and through allowedUsers alone (its group is the tenants').
    let platform_member = Who::As {
        user: &carol,
        group: &platform,
    };
    let allowed_user = Who::As {
        user: &bot,
        group: &tenants,
    };
    let (a, b, c) = (format!("{id}-a"), format!("{id}-b"), format!("{id}-c"));
    let _cleanup = Cleanup(vec![
        format!("validatingadmissionpolicybinding/{policy}"),
        format!("validatingadmissionpolicy/{policy}"),
        format!("clusterrolebinding/{id}-namespaces"),
        format!("clusterrole/{id}-namespaces"),
        format!("namespace/{a}"),
        format!("namespace/{b}"),
        format!("namespace/{c}"),
    ]);
    let dir = tempfile::tempdir().unwrap();

    // The chart's policy and binding as rendered with every namespace served, the default
    // group (system:masters) kept, one more group and one user allowed.
    let docs = render(
        &id,
        &[
            "watchAllNamespaces=true",
            &format!("organizationLabelPolicy.allowedGroups={{system:masters,{platform}}}"),
            &format!("organizationLabelPolicy.allowedUsers={{{bot}}}"),
        ],
    );
    let objects = policy_objects(&docs);
    assert_eq!(objects.len(), 2, "{objects:?}");
    let mut manifest = String::new();
    for doc in objects {
        manifest.push_str("---\n");
        manifest.push_str(&serde_yaml::to_string(doc).unwrap());
    }
    let file = write(dir.path(), "policy.yaml", &manifest);
    ok("kubectl apply the policy", support::kubectl(&["apply", "-f", &file]));

    // Everyone here may create, update and patch Namespaces (and their status), as far as RBAC
    // goes.
    let rbac = write(
        dir.path(),
        "rbac.yaml",
        &format!(
            "apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: {id}-namespaces}}
rules:
  - apiGroups: [\"\"]
    resources: [namespaces, namespaces/status, namespaces/finalize]
    verbs: [get, list, create, update, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: {id}-namespaces}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {id}-namespaces}}
subjects:
  - {{apiGroup: rbac.authorization.k8s.io, kind: Group, name: {tenants}}}
  - {{apiGroup: rbac.authorization.k8s.io, kind: Group, name: {platform}}}
"
        ),
    );
    ok("kubectl apply RBAC", support::kubectl(&["apply", "-f", &rbac]));

    let labelled = |ns: &str, org: &str| {
        write(
            dir.path(),
            &format!("{ns}.yaml"),
            &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    {LABEL}: {org}\n"),
        )
    };
    let refusal = format!("ValidatingAdmissionPolicy '{policy}' with binding '{policy}' denied request");
    let is_refused = |out: &Output| !out.status.success() && stderr(out).contains(&refusal);
    let refused = |what: &str, out: Output| {
        assert!(is_refused(&out), "{what}: not refused by the policy: {out:?}");
        let message = stderr(&out);
        // The message names the label and who may set it.
        for needle in [LABEL, "system:masters", platform.as_str(), bot.as_str()] {
            assert!(message.contains(needle), "{what}: {needle} not in {message}");
        }
    };

    // The API server loads policies asynchronously: wait until a tenant's labelled create (a dry
    // run, so nothing is made meanwhile) is refused.
    let probe = labelled(&a, "org_a");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = kubectl_as(tenant, &["create", "--dry-run=server", "-f", &probe]);
        if is_refused(&out) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the policy was not enforced within 60 s; last answer: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A tenant creates a namespace with the label: refused.
    refused(
        "a tenant creates a labelled namespace",
        kubectl_as(tenant, &["create", "-f", &probe]),
    );
    assert!(!support::kubectl(&["get", "namespace", &a]).status.success());
    // Without the label it may (so RBAC is not what refuses)...
    ok(
        "a tenant creates a namespace",
        kubectl_as(tenant, &["create", "namespace", &b]),
    );
    // ...but not add the label, by patch or through the status subresource.
    let add = format!("{LABEL}=org_b");
    refused(
        "a tenant adds the label",
        kubectl_as(tenant, &["label", "namespace", &b, &add]),
    );
    let status_patch = format!(r#"{{"metadata":{{"labels":{{"{LABEL}":"org_b"}}}}}}"#);
    refused(
        "a tenant adds the label through namespaces/status",
        kubectl_as(
            tenant,
            &[
                "patch",
                "namespace",
                &b,
                "--subresource=status",
                "--type=merge",
                "-p",
                &status_patch,
            ],
        ),
    );
    let finalize = write(
        dir.path(),
        "finalize.json",
        &serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": b, "labels": {LABEL: "org_b"}},
        })
        .to_string(),
    );
    refused(
        "a tenant adds the label through namespaces/finalize",
        kubectl_as(
            tenant,
            &[
                "replace",
                "--raw",
                &format!("/api/v1/namespaces/{b}/finalize"),
                "-f",
                &finalize,
            ],
        ),
    );
    assert_eq!(organization(&b), None);

    // A cluster admin (system:masters, the default allowed group) sets it.
    ok(
        "an admin labels the namespace",
        kubectl_as(Who::Admin, &["label", "namespace", &b, &add]),
    );
    assert_eq!(organization(&b).as_deref(), Some("org_b"));
    // The tenant may change the namespace's other labels, and write the same value again.
    ok(
        "a tenant changes another label",
        kubectl_as(tenant, &["label", "namespace", &b, "team=payments"]),
    );
    ok(
        "a tenant writes the organization label unchanged",
        kubectl_as(tenant, &["label", "--overwrite", "namespace", &b, &add]),
    );
    let now = labels(&b);
    assert_eq!(now.get("team").map(String::as_str), Some("payments"));
    assert_eq!(now.get(LABEL).map(String::as_str), Some("org_b"));
    // But not change it, nor remove it.
    let other = format!("{LABEL}=org_a");
    refused(
        "a tenant changes the label",
        kubectl_as(tenant, &["label", "--overwrite", "namespace", &b, &other]),
    );
    let remove = format!("{LABEL}-");
    refused(
        "a tenant removes the label",
        kubectl_as(tenant, &["label", "namespace", &b, &remove]),
    );
    assert_eq!(organization(&b).as_deref(), Some("org_b"));

    // An allowed group changes and removes it.
    ok(
        "a member of an allowed group changes the label",
        kubectl_as(platform_member, &["label", "--overwrite", "namespace", &b, &other]),
    );
    assert_eq!(organization(&b).as_deref(), Some("org_a"));
    ok(
        "a member of an allowed group removes the label",
        kubectl_as(platform_member, &["label", "namespace", &b, &remove]),
    );
    assert_eq!(organization(&b), None);
    // An allowed user creates a labelled namespace, and changes the label.
    ok(
        "an allowed user creates a labelled namespace",
        kubectl_as(allowed_user, &["create", "-f", &labelled(&c, "org_c")]),
    );
    assert_eq!(organization(&c).as_deref(), Some("org_c"));
    ok(
        "an allowed user changes the label",
        kubectl_as(allowed_user, &["label", "--overwrite", "namespace", &c, &other]),
    );
    assert_eq!(organization(&c).as_deref(), Some("org_a"));
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}
