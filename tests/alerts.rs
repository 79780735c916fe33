//! The chart's alerts and dashboard, checked by the tools that will run them: the PrometheusRule
//! rendered by real `helm template` is checked by `promtool check rules` and its unit tests
//! (tests/alerts/*.yaml) run by `promtool test rules`; every alert has its runbook; every query of
//! the Grafana dashboard parses (as a recording rule, through promtool) and names only series a
//! running operator exposes on its real `/metrics`, on the real control plane.
//!
//! promtool is built from the Go module proxy by `hack/promtool.sh` (`make promtool`, cached).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde::Deserialize;
use serde_yaml::Value;
use support::process::OperatorProcess;

/// What the unit tests of tests/alerts/ expect the series to be labelled with.
const RELEASE: &str = "capy-webhooks";
const NAMESPACE: &str = "capy-system";
const DEFAULT_RUNBOOKS: &str = "https://github.com/capydb/capy-webhooks/blob/main/docs/runbooks";

/// The alerts issue 24 asks for, by what they watch.
const ALERTS: [&str; 10] = [
    "CapyWebhooksOperatorDown",
    "CapyWebhooksOperatorNotReady",
    "CapyWebhooksNoControllerLeader",
    "CapyWebhooksShardsWithoutOwner",
    "CapyWebhooksDeliveriesFailing",
    "CapyWebhooksOldestPendingDeliveryOld",
    "CapyWebhooksWriteBudgetRefusing",
    "CapyWebhooksLogSegmentsRejected",
    "CapyWebhooksReconcileErrors",
    "CapyWebhooksEndpointsAutoDisabled",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> String {
    root().join("charts/capy-webhooks").display().to_string()
}

/// The promtool executable: `CAPY_PROMTOOL`, else what `hack/promtool.sh` builds (once, cached).
fn promtool() -> PathBuf {
    if let Ok(path) = std::env::var("CAPY_PROMTOOL") {
        return path.into();
    }
    let out = Command::new(root().join("hack/promtool.sh"))
        .stdin(Stdio::null())
        .output()
        .expect("hack/promtool.sh runs");
    assert!(
        out.status.success(),
        "building promtool failed (run `make promtool`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .into()
}

fn run(what: &str, command: &mut Command) -> String {
    let out: Output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    support::ok(what, out)
}

/// `helm template` of the chart (no cluster needed) with `sets`, only `template`.
fn render(template: &str, sets: &[&str]) -> Value {
    let mut command = Command::new(support::bin_dir().join("helm"));
    command.args([
        "template",
        RELEASE,
        &chart(),
        "--namespace",
        NAMESPACE,
        "--show-only",
        template,
    ]);
    for set in sets {
        command.args(["--set", set]);
    }
    serde_yaml::from_str(&run("helm template", &mut command)).unwrap()
}

fn rule_groups(sets: &[&str]) -> Value {
    let mut all = vec!["prometheusRule.enabled=true"];
    all.extend_from_slice(sets);
    let rule = render("templates/prometheusrule.yaml", &all);
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(rule["metadata"]["namespace"], NAMESPACE);
    rule["spec"]["groups"].clone()
}

/// Every alerting rule of the groups, by alert name.
fn alerts_of(groups: &Value) -> BTreeMap<String, Value> {
    groups
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").iter())
        .filter_map(|r| Some((r["alert"].as_str()?.to_string(), r.clone())))
        .collect()
}

/// Writes `{groups: ...}` to `dir/name` and runs `promtool check rules` on it.
fn check_rules(dir: &Path, name: &str, groups: &Value) -> String {
    let mut file = serde_yaml::Mapping::new();
    file.insert("groups".into(), groups.clone());
    let path = dir.join(name);
    std::fs::write(&path, serde_yaml::to_string(&file).unwrap()).unwrap();
    run(
        "promtool check rules",
        Command::new(promtool())
            .args(["check", "rules", "--lint=all", "--lint-fatal"])
            .arg(&path),
    )
}

fn unit_test_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("tests/alerts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no unit tests in tests/alerts/");
    files
}

/// The rendered rules pass `promtool check rules` (with its linter) and the unit tests of
/// tests/alerts/: each alert fires on the series that should fire it and stays quiet on healthy
/// ones.
#[test]
fn rendered_rules_pass_promtool_check_and_unit_tests() {
    let dir = tempfile::tempdir().unwrap();
    let groups = rule_groups(&[]);
    let checked = check_rules(dir.path(), "rules.yaml", &groups);
    assert!(checked.contains("SUCCESS"), "{checked}");

    // Every alert is tested both ways: some test expects it to fire, some expects it quiet.
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    let mut args = vec!["test".to_string(), "rules".to_string()];
    for file in unit_test_files() {
        let copy = dir.path().join(file.file_name().unwrap());
        std::fs::copy(&file, &copy).unwrap();
        args.push(copy.display().to_string());
        let tests: Value = serde_yaml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        for case in tests["tests"].as_sequence().unwrap() {
            for check in case["alert_rule_test"].as_sequence().into_iter().flatten() {
                let name = check["alertname"].as_str().unwrap().to_string();
                if check["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty()) {
                    fires.insert(name);
                } else {
                    quiet.insert(name);
                }
            }
        }
    }
    let tested = run(
        "promtool test rules",
        Command::new(promtool()).args(&args).current_dir(dir.path()),
    );
    assert!(tested.contains("SUCCESS"), "{tested}");

    let alerts = alerts_of(&groups);
    for alert in alerts.keys() {
        assert!(fires.contains(alert), "no unit test makes {alert} fire");
        assert!(quiet.contains(alert), "no unit test keeps {alert} quiet");
    }
}

/// The unit tests do fail when an alert is broken: a threshold moved so the firing series no
/// longer crosses it makes `promtool test rules` fail (so the suite above is not vacuous).
#[test]
fn unit_tests_fail_on_a_broken_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let groups = rule_groups(&["prometheusRule.oldestPendingDelivery.seconds=100000"]);
    check_rules(dir.path(), "rules.yaml", &groups);
    let file = root().join("tests/alerts/capy-webhooks.test.yaml");
    let copy = dir.path().join("capy-webhooks.test.yaml");
    std::fs::copy(&file, &copy).unwrap();
    let out = Command::new(promtool())
        .args(["test", "rules"])
        .arg(&copy)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "promtool passed rules that cannot fire:\n{text}");
    assert!(text.contains("CapyWebhooksOldestPendingDeliveryOld"), "{text}");
}

/// Issue 24's alerts are all there, each with a runbook_url under `prometheusRule.runbookBaseUrl`
/// whose file exists in docs/runbooks and says what the alert means, how to confirm it and what
/// to do; the README's Observability table lists each one with that link.
#[test]
fn every_alert_has_its_runbook() {
    let alerts = alerts_of(&rule_groups(&[]));
    let names: BTreeSet<&str> = alerts.keys().map(String::as_str).collect();
    assert_eq!(names, ALERTS.into_iter().collect(), "the alerts rendered");
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for (name, rule) in &alerts {
        assert_eq!(
            rule["annotations"]["runbook_url"].as_str(),
            Some(format!("{DEFAULT_RUNBOOKS}/{name}.md").as_str())
        );
        for key in ["summary", "description"] {
            assert!(
                rule["annotations"][key].as_str().is_some_and(|s| !s.is_empty()),
                "{name}: {key}"
            );
        }
        assert!(rule["labels"]["severity"].as_str().is_some(), "{name} has no severity");
        let runbook = root().join(format!("docs/runbooks/{name}.md"));
        let text = std::fs::read_to_string(&runbook).unwrap_or_else(|e| panic!("{}: {e}", runbook.display()));
        assert!(text.starts_with(&format!("# {name}\n")), "{}", runbook.display());
        for section in ["## What it means", "## How to confirm", "## What to do"] {
            assert!(text.contains(section), "{} lacks {section}", runbook.display());
        }
        assert!(
            readme.contains(&format!("[`{name}`](docs/runbooks/{name}.md)")),
            "README.md's Observability table does not link {name}'s runbook"
        );
    }
    // The base URL is a value; a trailing slash does not double.
    let moved = alerts_of(&rule_groups(&[
        "prometheusRule.runbookBaseUrl=https://wiki.example.com/runbooks/",
        "prometheusRule.additionalAlertLabels.team=platform",
    ]));
    let rule = &moved["CapyWebhooksDeliveriesFailing"];
    assert_eq!(
        rule["annotations"]["runbook_url"],
        "https://wiki.example.com/runbooks/CapyWebhooksDeliveriesFailing.md"
    );
    assert_eq!(rule["labels"]["team"], "platform");
    assert_eq!(rule["labels"]["severity"], "warning");
}

/// The dashboard as the chart renders it: a ConfigMap for the Grafana sidecar holding the JSON
/// file of the chart unchanged.
fn rendered_dashboard() -> serde_json::Value {
    let map = render("templates/dashboard.yaml", &["dashboards.enabled=true"]);
    assert_eq!(map["kind"], "ConfigMap");
    assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
    let text = map["data"]["capy-webhooks.json"].as_str().expect("the dashboard JSON");
    let file = std::fs::read_to_string(root().join("charts/capy-webhooks/dashboards/capy-webhooks.json")).unwrap();
    assert_eq!(
        text.trim_end(),
        file.trim_end(),
        "the ConfigMap holds the file as it is"
    );
    serde_json::from_str(text).unwrap()
}

/// Every PromQL query of the dashboard (panel targets and variable queries), with Grafana's
/// variables replaced by values Prometheus accepts.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("each target has an expr");
            queries.push((panel["title"].as_str().unwrap().to_string(), expr.to_string()));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["query"]["query"].as_str() {
            // label_values(SELECTOR, label) is Grafana's, not PromQL: its selector is the query.
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
                .map_or(query, |(selector, _)| selector);
            queries.push((format!("variable {}", variable["name"]), inner.to_string()));
        }
    }
    queries
        .into_iter()
        .map(|(what, q)| {
            let q = q
                .replace("$__rate_interval", "5m")
                .replace("$namespace", NAMESPACE)
                .replace("$job", "capy-webhooks-metrics");
            assert!(!q.contains('$'), "{what}: a Grafana variable left in {q}");
            (what, q)
        })
        .collect()
}

/// The metric names a query selects: every `name{` (each selector of the dashboard has labels).
fn selected_names(query: &str) -> BTreeSet<String> {
    let bytes = query.as_bytes();
    let mut names = BTreeSet::new();
    for (i, _) in query.match_indices('{') {
        let start = query[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .map_or(0, |p| p + 1);
        if start < i && !bytes[start].is_ascii_digit() {
            names.insert(query[start..i].to_string());
        }
    }
    names
}

#[test]
fn selected_names_finds_each_selector() {
    assert_eq!(
        selected_names(r#"sum(rate(a_total{x="1"}[5m])) / max(b_bytes{y="2"} > 0) + c{}"#),
        ["a_total", "b_bytes", "c"].into_iter().map(String::from).collect()
    );
    assert!(selected_names("sum by (le) (x)").is_empty());
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The series names a real operator exposes on `/metrics` once ready, on the real control plane.
async fn exposed_series_names() -> BTreeSet<String> {
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, "alerts").await;
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let args: Vec<String> = ["--api-listen", "--ingest-listen", "--metrics-listen"]
        .iter()
        .zip(&ports)
        .flat_map(|(flag, port)| [flag.to_string(), format!("127.0.0.1:{port}")])
        .collect();
    let _op = OperatorProcess::start(&ns, &support::kubeconfig_path(), dir.path(), "operator.log", &args);
    let http = reqwest::Client::new();
    let ops = |path: &str| format!("http://127.0.0.1:{}{path}", ports[2]);
    support::wait_for("/readyz 200", Duration::from_secs(60), || async {
        let res = http.get(ops("/readyz")).send().await.ok()?;
        (res.status() == 200).then_some(())
    })
    .await;
    let text = http.get(ops("/metrics")).send().await.unwrap().text().await.unwrap();
    support::delete_namespace(&client, &ns).await;
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

/// Every dashboard query parses (promtool checks it as a recording rule) and names only series
/// that a running operator exposes (histograms by their `_bucket`, `_sum`, `_count` series;
/// `process_*` too); the alert rules likewise, but for `up`, which Prometheus makes.
#[tokio::test]
async fn dashboard_queries_parse_and_name_only_exposed_series() {
    let dashboard = rendered_dashboard();
    let queries = dashboard_queries(&dashboard);
    let titles: Vec<&str> = queries.iter().map(|(w, _)| w.as_str()).collect();
    for wanted in [
        "Deliveries per second by outcome",
        "Ingest → first attempt latency",
        "Failed attempts per second by class",
        "Pending deliveries",
        "Oldest pending delivery: wait past its due time",
        "Write budget use",
        "Bytes written through the API server by kind",
        "Shards held per replica, and unowned",
        "Controller leader and readiness",
        "CPU per replica",
        "Resident memory per replica",
    ] {
        assert!(titles.contains(&wanted), "no panel {wanted:?} in {titles:?}");
    }

    let rules: Vec<serde_json::Value> = queries
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| serde_json::json!({ "record": format!("dashboard:query_{i}"), "expr": expr }))
        .collect();
    let groups: Value = serde_yaml::to_value(serde_json::json!([{ "name": "dashboard", "rules": rules }])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The linter would object to recording-rule names; only parsing is asked here.
    let mut file = serde_yaml::Mapping::new();
    file.insert("groups".into(), groups);
    let path = dir.path().join("dashboard-rules.yaml");
    std::fs::write(&path, serde_yaml::to_string(&file).unwrap()).unwrap();
    let checked = run(
        "promtool check rules (dashboard queries)",
        Command::new(promtool()).args(["check", "rules"]).arg(&path),
    );
    assert!(checked.contains(&format!("{} rules found", queries.len())), "{checked}");

    let exposed = exposed_series_names().await;
    for family in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "capy_webhooks_ready",
    ] {
        assert!(exposed.contains(family), "{family} not exposed: {exposed:?}");
    }
    let mut named = BTreeSet::new();
    for (what, query) in &queries {
        let names = selected_names(query);
        assert!(!names.is_empty(), "{what}: no metric in {query}");
        for name in names {
            assert!(exposed.contains(&name), "{what}: {name} is not exposed by the operator");
            named.insert(name);
        }
    }
    for rule in alerts_of(&rule_groups(&[])).values() {
        let expr = rule["expr"].as_str().unwrap();
        for name in selected_names(expr).into_iter().filter(|n| n != "up") {
            assert!(
                exposed.contains(&name),
                "alert {}: {name} is not exposed",
                rule["alert"].as_str().unwrap()
            );
        }
    }
    assert!(
        named.contains("capy_webhooks_first_attempt_delay_seconds_bucket"),
        "{named:?}"
    );
}

/// The command the README's "Observability" section gives runs verbatim (from the repository's
/// root, with the bundled helm first on PATH) and renders the PrometheusRule and the dashboard.
#[test]
fn the_readmes_observability_command_runs_verbatim() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("\n## Observability\n")
        .nth(1)
        .expect("README.md has ## Observability");
    let section = section.split("\n## ").next().unwrap();
    let command = section
        .split("```sh\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap().trim())
        .find(|block| block.starts_with("helm template"))
        .expect("a helm template command in the Observability section");
    let path = format!(
        "{}:{}",
        support::bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = run(
        "the README's helm template",
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", command])
            .env("PATH", path)
            .current_dir(root()),
    );
    let kinds: Vec<String> = serde_yaml::Deserializer::from_str(&out)
        .filter_map(|doc| Some(Value::deserialize(doc).ok()?["kind"].as_str()?.to_string()))
        .collect();
    assert_eq!(kinds, ["PrometheusRule", "ConfigMap"], "{out}");
}
