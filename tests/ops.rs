//! The operations port of the real binary: `/healthz` and `/readyz` during start-up (API server
//! unreachable) and once running, and `/metrics` as OpenMetrics text whose counters follow the
//! work done.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::operator::INGEST_TOKEN;
use support::process::OperatorProcess;
use support::receiver::Receiver;

const ORG: &str = "org_ops";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The listeners of one operator process.
#[derive(Clone, Copy)]
struct Ports {
    api: u16,
    ingest: u16,
    metrics: u16,
}

impl Ports {
    fn fresh() -> Self {
        Self {
            api: free_port(),
            ingest: free_port(),
            metrics: free_port(),
        }
    }
    fn args(&self) -> Vec<String> {
        [
            ("--api-listen", self.api),
            ("--ingest-listen", self.ingest),
            ("--metrics-listen", self.metrics),
        ]
        .into_iter()
        .flat_map(|(flag, port)| [flag.to_string(), format!("127.0.0.1:{port}")])
        .collect()
    }
    fn ops(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.metrics)
    }
}

/// A copy of the test cluster's kubeconfig, written to `dir/name` after `edit`.
fn edited_kubeconfig(dir: &Path, name: &str, edit: impl FnOnce(&mut serde_yaml::Value)) -> PathBuf {
    let text = std::fs::read_to_string(support::kubeconfig_path()).unwrap();
    let mut config: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    edit(&mut config);
    let path = dir.join(name);
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

/// The test cluster's kubeconfig with every server set to `server`.
fn kubeconfig_pointing_at(server: &str, dir: &Path) -> PathBuf {
    edited_kubeconfig(dir, "unreachable-kubeconfig", |config| {
        for cluster in config["clusters"].as_sequence_mut().expect("clusters") {
            cluster["cluster"]["server"] = serde_yaml::Value::String(server.into());
        }
    })
}

/// The test cluster's kubeconfig authenticating with `token` instead of the admin certificate.
fn kubeconfig_with_token(token: &str, dir: &Path) -> PathBuf {
    edited_kubeconfig(dir, "token-kubeconfig", |config| {
        for user in config["users"].as_sequence_mut().expect("users") {
            user["user"] = serde_yaml::to_value(json!({ "token": token })).unwrap();
        }
    })
}

async fn get(http: &reqwest::Client, url: &str) -> Option<(u16, String, String)> {
    let res = http.get(url).timeout(Duration::from_secs(5)).send().await.ok()?;
    let status = res.status().as_u16();
    let content_type = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Some((status, content_type, res.text().await.ok()?))
}

/// One sample of an exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: metric family types by name, and the samples.
#[derive(Debug, Default)]
struct Exposition {
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    /// Sum of the samples named `name` whose labels include every pair of `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text.parse().map_err(|e| format!("bad value {text:?}: {e}")),
    }
}

/// `{a="x",b="y"}` (the braces already removed) into a map; handles `\\`, `\"` and `\n`.
fn parse_labels(mut text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    while !text.is_empty() {
        let (key, rest) = text.split_once("=\"").ok_or_else(|| format!("bad label in {text:?}"))?;
        if !is_metric_name(key) || key.contains(':') {
            return Err(format!("bad label name {key:?}"));
        }
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => return Err(format!("bad escape {other:?} in {rest:?}")),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err(format!("unterminated label value in {rest:?}")),
            }
        };
        if labels.insert(key.to_string(), value).is_some() {
            return Err(format!("label {key} twice"));
        }
        text = &rest[end + 1..];
        text = text.strip_prefix(',').unwrap_or(text);
    }
    Ok(labels)
}

/// Parses OpenMetrics text line by line: `# TYPE`, `# HELP`, `# UNIT`, samples
/// `name{labels} value` or `name value`, and `# EOF` as the last line.
fn parse_exposition(text: &str) -> Result<Exposition, String> {
    let mut exposition = Exposition::default();
    let body = text
        .strip_suffix("# EOF\n")
        .or_else(|| text.strip_suffix("# EOF"))
        .ok_or("the exposition does not end with # EOF")?;
    for line in body.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (kind, name, rest) = (parts.next(), parts.next(), parts.next());
            let name = name.filter(|n| is_metric_name(n)).ok_or(format!("bad line {line:?}"))?;
            match (kind, rest) {
                (Some("TYPE"), Some(t)) => {
                    let known = [
                        "counter",
                        "gauge",
                        "histogram",
                        "gaugehistogram",
                        "summary",
                        "info",
                        "stateset",
                        "unknown",
                    ];
                    if !known.contains(&t) {
                        return Err(format!("unknown type in {line:?}"));
                    }
                    if exposition.types.insert(name.to_string(), t.to_string()).is_some() {
                        return Err(format!("{name} declared twice"));
                    }
                }
                (Some("HELP"), Some(_)) | (Some("UNIT"), Some(_)) => {}
                _ => return Err(format!("bad comment line {line:?}")),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or(format!("bad sample line {line:?}"))?;
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').ok_or(format!("bad labels in {line:?}"))?;
                (name, parse_labels(inner)?)
            }
            None => (series, BTreeMap::new()),
        };
        if !is_metric_name(name) {
            return Err(format!("bad metric name in {line:?}"));
        }
        let family_declared = exposition.types.contains_key(name)
            || ["_total", "_bucket", "_count", "_sum", "_created"]
                .iter()
                .any(|suffix| {
                    name.strip_suffix(suffix)
                        .is_some_and(|f| exposition.types.contains_key(f))
                });
        if !family_declared {
            return Err(format!("sample {name} of no declared family"));
        }
        exposition.samples.push(Sample {
            name: name.to_string(),
            labels,
            value: parse_value(value)?,
        });
    }
    Ok(exposition)
}

async fn scrape(http: &reqwest::Client, ports: Ports) -> Exposition {
    let (status, content_type, text) = get(http, &ports.ops("/metrics")).await.expect("/metrics answers");
    assert_eq!(status, 200);
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    parse_exposition(&text).unwrap_or_else(|e| panic!("/metrics is not OpenMetrics text ({e}):\n{text}"))
}

#[test]
fn the_parser_refuses_broken_text() {
    let good = "# HELP a_total x\n# TYPE a counter\na_total{k=\"v\\\"w\"} 1\n# EOF\n";
    let parsed = parse_exposition(good).unwrap();
    assert_eq!(parsed.sum("a_total", &[("k", "v\"w")]), 1.0);
    for bad in [
        "# TYPE a counter\na_total 1\n",
        "a_total 1\n# EOF\n",
        "# TYPE a counter\na_total{k=\"v} 1\n# EOF\n",
        "# TYPE a counter\na_total one\n# EOF\n",
        "# TYPE a widget\n# EOF\n",
    ] {
        assert!(parse_exposition(bad).is_err(), "{bad:?}");
    }
}

#[tokio::test]
async fn probes_and_metrics_of_the_binary() {
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, "ops").await;
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();

    // 1. The API server cannot be reached: alive, but not ready.
    let closed = free_port();
    let unreachable = kubeconfig_pointing_at(&format!("https://127.0.0.1:{closed}"), dir.path());
    let ports = Ports::fresh();
    let mut starting = OperatorProcess::start(&ns, &unreachable, dir.path(), "unreachable.log", &ports.args());
    support::wait_for(
        "/healthz while the caches cannot sync",
        Duration::from_secs(30),
        || async {
            get(&http, &ports.ops("/healthz"))
                .await
                .filter(|(status, _, body)| *status == 200 && body == "ok")
        },
    )
    .await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let (status, _, body) = get(&http, &ports.ops("/readyz")).await.expect("/readyz answers");
        assert_eq!(status, 503, "{body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["ready"], false);
        let not_ready: Vec<&str> = body["not_ready"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for component in ["api", "controller", "dispatcher"] {
            assert!(not_ready.contains(&component), "{body}");
        }
        let (status, _, _) = get(&http, &ports.ops("/healthz")).await.expect("/healthz answers");
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Waiting for the API server is not a reason to exit: the controller retries, and says so.
    // SIGTERM still ends it, cleanly, although no component has finished starting.
    assert!(starting.child.try_wait().unwrap().is_none(), "the operator exited");
    let pid = starting.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = support::wait_for(
        "the starting operator exits after SIGTERM",
        Duration::from_secs(10),
        || {
            let exited = starting.child.try_wait().unwrap();
            async move { exited }
        },
    )
    .await;
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(dir.path().join("unreachable.log")).unwrap();
    assert!(log.contains("cannot list WebhookEndpoints yet; retrying"), "{log}");

    // 2. The real cluster: ready once every component is.
    let ports = Ports::fresh();
    let mut op = OperatorProcess::start(
        &ns,
        &support::kubeconfig_path(),
        dir.path(),
        "operator.log",
        &ports.args(),
    );
    let ready: Value = support::wait_for("/readyz 200", Duration::from_secs(60), || async {
        let (status, _, body) = get(&http, &ports.ops("/readyz")).await?;
        (status == 200).then(|| serde_json::from_str(&body).unwrap())
    })
    .await;
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(
        ready["components"],
        json!({"api": true, "controller": true, "dispatcher": true})
    );
    // Every family but the per-route ones (which appear with the first request) is there at once.
    let before = scrape(&http, ports).await;
    for (family, kind) in [
        ("capy_webhooks_reconciles", "counter"),
        ("capy_webhooks_reconcile_duration_seconds", "histogram"),
        ("capy_webhooks_reconcile_errors", "counter"),
        ("capy_webhooks_deliveries", "counter"),
        ("capy_webhooks_delivery_attempts", "counter"),
        ("capy_webhooks_attempt_duration_seconds", "histogram"),
        ("capy_webhooks_pending_deliveries", "gauge"),
        ("capy_webhooks_log_write_batch_records", "histogram"),
        ("capy_webhooks_log_writes", "counter"),
        ("capy_webhooks_apiserver_writes", "counter"),
    ] {
        assert_eq!(before.types.get(family).map(String::as_str), Some(kind), "{family}");
    }
    assert_eq!(
        before.sum("capy_webhooks_deliveries_total", &[("outcome", "succeeded")]),
        0.0
    );

    // 3. Work: an endpoint over REST, an event delivered to a loopback receiver.
    let receiver = Receiver::start(vec![]).await;
    let (_, key) = capy_webhooks::auth::api_keys::create_key(&client, &ns, ORG, None, None)
        .await
        .unwrap();
    let id = support::process::create_endpoint(&http, ports.api, ORG, &key, &receiver.url("/hook")).await;
    let res = http
        .post(format!(
            "http://127.0.0.1:{}/v1/organizations/{ORG}/events",
            ports.ingest
        ))
        .bearer_auth(INGEST_TOKEN)
        .json(&json!({"type": "database.created", "data": {"name": "orders"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["deliveries"], 1, "{body}");
    support::wait_for("the receiver got the event", Duration::from_secs(30), || async {
        (!receiver.received().is_empty()).then_some(())
    })
    .await;

    // 4. The counters moved.
    let create_route = [
        ("component", "api"),
        ("route", "/v1/organizations/:org/webhook-endpoints"),
        ("method", "POST"),
        ("status", "201"),
    ];
    let after = support::wait_for("metrics of the work done", Duration::from_secs(30), || async {
        let m = scrape(&http, ports).await;
        let moved = m.sum("capy_webhooks_reconciles_total", &[]) >= 1.0
            && m.sum("capy_webhooks_reconcile_duration_seconds_count", &[]) >= 1.0
            && m.sum("capy_webhooks_http_requests_total", &create_route) >= 1.0
            && m.sum("capy_webhooks_deliveries_total", &[("outcome", "succeeded")]) >= 1.0
            && m.sum("capy_webhooks_delivery_attempts_total", &[("result", "success")]) >= 1.0
            && m.sum("capy_webhooks_attempt_duration_seconds_count", &[]) >= 1.0
            && m.sum("capy_webhooks_first_attempt_delay_seconds_count", &[]) >= 1.0
            && m.sum("capy_webhooks_oldest_pending_delivery_age_seconds", &[]) == 0.0
            && m.sum("capy_webhooks_ready", &[]) == 1.0
            && m.sum("capy_webhooks_shards_unowned", &[]) == 0.0
            && m.sum("capy_webhooks_log_writes_total", &[]) >= 2.0
            && m.sum("capy_webhooks_pending_deliveries", &[]) == 0.0
            && m.sum("capy_webhooks_apiserver_writes_total", &[("kind", "secret")]) >= 1.0
            && m.sum("capy_webhooks_apiserver_writes_total", &[("kind", "endpoint")]) >= 1.0
            && m.sum("capy_webhooks_apiserver_writes_total", &[("kind", "endpoint_status")]) >= 1.0
            && m.sum("capy_webhooks_apiserver_writes_total", &[("kind", "configmap")]) >= 2.0
            && m.sum("capy_webhooks_apiserver_writes_total", &[("kind", "event")]) >= 1.0;
        moved.then_some(m)
    })
    .await;
    assert_eq!(after.types["capy_webhooks_http_request_duration_seconds"], "histogram");
    assert_eq!(after.types["capy_webhooks_http_requests"], "counter");
    assert!(
        after.sum(
            "capy_webhooks_http_requests_total",
            &[
                ("component", "ingest"),
                ("route", "/v1/organizations/:org/events"),
                ("status", "202")
            ]
        ) >= 1.0
    );
    assert!(
        after.sum(
            "capy_webhooks_http_request_duration_seconds_count",
            &[
                ("component", "api"),
                ("route", "/v1/organizations/:org/webhook-endpoints")
            ]
        ) >= 1.0
    );
    // Route labels are templates: no organization or endpoint id in any label.
    for sample in &after.samples {
        for value in sample.labels.values() {
            assert!(!value.contains(ORG) && !value.contains(&id), "{sample:?}");
        }
    }

    // 5. SIGTERM: every server stops gracefully and the process exits cleanly.
    let pid = op.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = support::wait_for("the operator exits after SIGTERM", Duration::from_secs(30), || {
        let exited = op.child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(status.success(), "{status:?}");
    assert!(get(&http, &ports.ops("/healthz")).await.is_none());
    support::delete_namespace(&client, &ns).await;
}

/// An operator whose identity may not list WebhookEndpoints (no RBAC role: the most common
/// install mistake besides a missing CRD) can never fill its caches. The process must exit and say
/// why, whichever components it runs, not hang unready.
#[tokio::test]
async fn an_operator_forbidden_to_list_endpoints_exits_and_says_why() {
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, "forbidden").await;
    let dir = tempfile::tempdir().unwrap();
    // The namespace's `default` service account (made by the controller manager) has no role.
    let token = support::wait_for(
        "a token for the default service account",
        Duration::from_secs(30),
        || {
            let out = support::kubectl(&["create", "token", "default", "-n", &ns]);
            let token = out
                .status
                .success()
                .then(|| String::from_utf8(out.stdout).unwrap().trim().to_string());
            async move { token }
        },
    )
    .await;
    let kubeconfig = kubeconfig_with_token(&token, dir.path());
    // All components, and a split deployment without the controller.
    for (log_name, components) in [
        ("forbidden.log", "api,controller,dispatcher"),
        ("forbidden-split.log", "api,dispatcher"),
    ] {
        let mut args = Ports::fresh().args();
        args.extend(["--components".to_string(), components.to_string()]);
        let mut op = OperatorProcess::start(&ns, &kubeconfig, dir.path(), log_name, &args);
        let status = support::wait_for("the operator exits", Duration::from_secs(60), || {
            let exited = op.child.try_wait().unwrap();
            async move { exited }
        })
        .await;
        let log = std::fs::read_to_string(dir.path().join(log_name)).unwrap();
        assert!(!status.success(), "{components}: {status:?}\n{log}");
        assert!(log.contains("cannot list WebhookEndpoints"), "{components}: {log}");
        assert!(log.contains("forbidden"), "{components}: {log}");
        assert!(!log.contains(&token), "the log must not echo the token");
    }
    support::delete_namespace(&client, &ns).await;
}

/// After a flow that touches every secret the system holds (create, rotate, deliveries that
/// succeed and fail, authentication errors), none of them appears in the logs (JSON and text),
/// Events, endpoint status, ConfigMaps or metrics.
#[tokio::test]
async fn no_secret_leaks_into_logs_events_status_configmaps_or_metrics() {
    for format in ["json", "text"] {
        let client = support::client().await;
        support::install_crd(&client).await;
        let ns = support::test_namespace(&client, &format!("leaks-{format}")).await;
        let dir = tempfile::tempdir().unwrap();
        let ports = Ports::fresh();
        let mut args = ports.args();
        args.extend(["--log-format".to_string(), format.to_string()]);
        let mut op = OperatorProcess::start(&ns, &support::kubeconfig_path(), dir.path(), "operator.log", &args);
        let (_, api_key) = capy_webhooks::auth::api_keys::create_key(&client, &ns, ORG, None, None)
            .await
            .unwrap();
        let http = reqwest::Client::new();
        let base = format!(
            "http://127.0.0.1:{}/v1/organizations/{ORG}/webhook-endpoints",
            ports.api
        );
        support::wait_for("the REST API", Duration::from_secs(60), || async {
            let r = http.get(&base).bearer_auth(&api_key).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
        let mut secrets = vec![api_key.clone(), INGEST_TOKEN.to_string()];
        let ok_receiver = Receiver::start(vec![]).await;
        let failing = Receiver::start(vec![support::receiver::Answer::Status(500); 10]).await;
        let mut ids = Vec::new();
        for url in [ok_receiver.url("/ok"), failing.url("/fail")] {
            let created: Value = http
                .post(&base)
                .bearer_auth(&api_key)
                .json(&json!({"url": url}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            secrets.push(created["plaintext_secret"].as_str().unwrap().to_string());
            ids.push(created["webhook_endpoint"]["id"].as_str().unwrap().to_string());
        }
        let rotated: Value = http
            .post(format!("{base}/{}/rotate-secret", ids[0]))
            .bearer_auth(&api_key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        secrets.push(
            rotated["plaintext_secret"]
                .as_str()
                .expect("rotated secret")
                .to_string(),
        );
        // A portal session, and a custom header value (the receiver's credential): neither may
        // reach logs, Events, ConfigMaps or metrics (the header value lives in the CR's spec by
        // design, so the CRs are not searched for it).
        let session: Value = http
            .post(format!(
                "http://127.0.0.1:{}/v1/organizations/{ORG}/portal-sessions",
                ports.api
            ))
            .bearer_auth(&api_key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let portal_token = session["token"].as_str().expect("portal token").to_string();
        let r = http.get(&base).bearer_auth(&portal_token).send().await.unwrap();
        assert_eq!(r.status(), 200);
        secrets.push(portal_token);
        let header_value = format!("Bearer receiver-credential-{format}-7c1e9a");
        let r = http
            .patch(format!("{base}/{}/settings", ids[1]))
            .bearer_auth(&api_key)
            .json(&json!({"headers": {"Authorization": header_value}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        // Wrong credentials of every kind, which must not be echoed either.
        let wrong_key = format!("capy_live_{}", "Z".repeat(40));
        let wrong_token = "wrong-ingest-token-0123456789";
        let forged_jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
        for bad in [wrong_key.as_str(), forged_jwt] {
            let r = http.get(&base).bearer_auth(bad).send().await.unwrap();
            assert_eq!(r.status(), 401);
        }
        let ingest = format!("http://127.0.0.1:{}/v1/organizations/{ORG}/events", ports.ingest);
        let r = http
            .post(&ingest)
            .bearer_auth(wrong_token)
            .json(&json!({"type": "a.b", "data": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        secrets.extend([wrong_key, wrong_token.to_string()]);
        for n in 0..3 {
            let r = http
                .post(&ingest)
                .bearer_auth(INGEST_TOKEN)
                .json(&json!({"type": "a.b", "data": {"n": n}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
        }
        support::wait_for("deliveries and failures", Duration::from_secs(30), || async {
            (ok_receiver.received().len() >= 3 && failing.received().len() >= 3).then_some(())
        })
        .await;
        // A summary interval (1 s) for the status to carry the failures.
        support::wait_for("a failure in the status", Duration::from_secs(30), || async {
            let ep = support::kubectl(&["get", "webhookendpoints", &ids[1], "-n", &ns, "-o", "json"]);
            String::from_utf8_lossy(&ep.stdout)
                .contains("lastFailureAt")
                .then_some(())
        })
        .await;
        let metrics = http
            .get(ports.ops("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        op.kill();

        let mut haystacks = vec![
            ("log", std::fs::read_to_string(dir.path().join("operator.log")).unwrap()),
            ("metrics", metrics),
        ];
        for kind in ["events", "webhookendpoints", "configmaps"] {
            let out = support::kubectl(&["get", kind, "-n", &ns, "-o", "json"]);
            haystacks.push((kind, String::from_utf8_lossy(&out.stdout).to_string()));
        }
        assert!(haystacks[0].1.contains("endpoint created"), "the log was captured");
        for secret in &secrets {
            // The secret, and for signing secrets the key material without its prefix.
            let material = secret.strip_prefix("whsec_").unwrap_or(secret);
            for (what, text) in &haystacks {
                assert!(
                    !text.contains(secret.as_str()) && !text.contains(material),
                    "a secret ({}...) leaked into the {what} ({format} logs)",
                    &secret[..8.min(secret.len())]
                );
            }
        }
        assert!(
            failing
                .received()
                .iter()
                .any(|r| r.header("authorization") == header_value),
            "the custom header was sent"
        );
        for (what, text) in haystacks.iter().filter(|(what, _)| *what != "webhookendpoints") {
            assert!(
                !text.contains(&header_value),
                "a custom header value leaked into the {what} ({format} logs)"
            );
        }
        support::delete_namespace(&client, &ns).await;
    }
}

/// Whether the replica on `ports` says it leads the controller; `None` when it does not answer.
async fn leads(http: &reqwest::Client, ports: Ports) -> Option<bool> {
    let (status, _, text) = get(http, &ports.ops("/metrics")).await?;
    (status == 200).then_some(())?;
    let exposition = parse_exposition(&text).ok()?;
    Some(exposition.sum("capy_webhooks_controller_leader", &[]) == 1.0)
}

/// Several replicas, one controller: the holder of the controller Lease. Killed with SIGKILL, its
/// Lease expires and another replica takes over, so an endpoint created through another replica
/// still gets its secret; on SIGTERM the leader releases the Lease and the handover is at once.
#[tokio::test]
async fn one_controller_among_replicas_and_a_handover_when_it_dies() {
    const LEASE: Duration = Duration::from_secs(6);
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, "leader").await;
    let dir = tempfile::tempdir().unwrap();
    let start = |name: &str, ports: Ports| {
        let mut args = ports.args();
        args.extend(
            [
                "--components",
                "api,controller",
                "--identity",
                name,
                "--lease-duration",
                "6s",
                "--controller-wait",
                "30s",
            ]
            .map(String::from),
        );
        OperatorProcess::start(
            &ns,
            &support::kubeconfig_path(),
            dir.path(),
            &format!("{name}.log"),
            &args,
        )
    };
    let http = reqwest::Client::new();
    let mut replicas: Vec<(String, Ports, OperatorProcess)> = ["a", "b", "c"]
        .into_iter()
        .map(|name| {
            let ports = Ports::fresh();
            (name.to_string(), ports, start(name, ports))
        })
        .collect();
    let one_leader = |replicas: &[(String, Ports, OperatorProcess)]| {
        let targets: Vec<(String, Ports)> = replicas.iter().map(|(n, p, _)| (n.clone(), *p)).collect();
        let http = http.clone();
        async move {
            let mut leaders = Vec::new();
            for (name, ports) in &targets {
                match leads(&http, *ports).await {
                    Some(true) => leaders.push(name.clone()),
                    Some(false) => {}
                    None => return None,
                }
            }
            (leaders.len() == 1).then(|| leaders.remove(0))
        }
    };
    let leader = support::wait_for("exactly one controller leader", Duration::from_secs(60), || {
        one_leader(&replicas)
    })
    .await;
    let holder = support::kubectl(&[
        "get",
        "lease",
        "capy-webhooks-controller",
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&holder.stdout),
        leader,
        "kubectl get leases shows who leads"
    );

    // SIGKILL the leader: no release, the Lease must expire.
    let index = replicas.iter().position(|(n, _, _)| *n == leader).unwrap();
    let (_, _, mut killed) = replicas.remove(index);
    killed.kill();
    let killed_at = Instant::now();
    let (api_key_record, key) = capy_webhooks::auth::api_keys::create_key(&client, &ns, ORG, None, None)
        .await
        .unwrap();
    drop(api_key_record);
    let survivor = replicas[0].1;
    let base = format!(
        "http://127.0.0.1:{}/v1/organizations/{ORG}/webhook-endpoints",
        survivor.api
    );
    support::wait_for("the survivor's REST API", Duration::from_secs(30), || async {
        let r = http.get(&base).bearer_auth(&key).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let created = http
        .post(&base)
        .bearer_auth(&key)
        .json(&json!({"url": "https://hooks.example.com/in"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        created.status(),
        201,
        "created through another replica, with its secret"
    );
    let body: Value = created.json().await.unwrap();
    assert!(body["plaintext_secret"].as_str().unwrap().starts_with("whsec_"));
    let took = killed_at.elapsed();
    assert!(
        took <= LEASE + Duration::from_secs(5),
        "the controller took over after {took:?}"
    );
    let next = support::wait_for("a new leader", Duration::from_secs(30), || one_leader(&replicas)).await;
    assert_ne!(next, leader);

    // SIGTERM the new leader: it releases the Lease, and the last replica leads well before the
    // Lease would have expired.
    let index = replicas.iter().position(|(n, _, _)| *n == next).unwrap();
    let (_, _, mut stopped) = replicas.remove(index);
    let pid = stopped.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let sent = Instant::now();
    let last = replicas[0].1;
    support::wait_for("the last replica leads", Duration::from_secs(30), || async {
        (leads(&http, last).await == Some(true)).then_some(())
    })
    .await;
    let handover = sent.elapsed();
    // Not merely before the Lease expires: a replica that does not lead would otherwise look at
    // the Lease again only when the last renewal expires, 2 to 6 s after the release (3 s leaves room for a loaded machine).
    assert!(
        handover < Duration::from_secs(3),
        "on SIGTERM the Lease is released and taken at once, not when a renewal expires: {handover:?}"
    );
    let _ = stopped.child.wait();
    println!("takeover after SIGKILL: {took:?}; handover on SIGTERM: {handover:?}");
    support::delete_namespace(&client, &ns).await;
}
