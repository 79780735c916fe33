//! Traces end to end: the operator binary exports over OTLP/HTTP to a real OpenTelemetry Collector
//! (built from the Go module proxy by `hack/otel-collector.sh`) that writes what it receives to a
//! file. A producer's `traceparent` on an event makes the event's ingest and every attempt of its
//! delivery, one before a restart of the operator and one after, spans of the producer's trace;
//! the receiver never sees a trace header. With two replicas, work a replica forwards to the
//! organization's owner stays in the trace of the request that asked for it.

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::operator::INGEST_TOKEN;
use support::process::OperatorProcess;
use support::receiver::{Answer, Receiver};

const ORG: &str = "org_traces";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The collector executable: `CAPY_OTELCOL`, else what `hack/otel-collector.sh` builds (once).
fn collector_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CAPY_OTELCOL").filter(|p| !p.is_empty()) {
        return path.into();
    }
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/otel-collector.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("hack/otel-collector.sh runs");
    assert!(
        out.status.success(),
        "building the collector failed (run `make otel-collector`)"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    stdout
        .lines()
        .last()
        .expect("the script prints the binary's path")
        .trim()
        .into()
}

/// A collector receiving OTLP/HTTP on `port` and writing each export as a JSON line to `file`.
struct Collector {
    child: Child,
}

impl Collector {
    fn start(dir: &Path, port: u16, file: &Path) -> Self {
        let config = dir.join("collector.yaml");
        std::fs::write(
            &config,
            format!(
                r#"receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{port}
exporters:
  file:
    path: {file}
    flush_interval: 100ms
service:
  telemetry:
    metrics:
      level: none
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [file]
"#,
                file = file.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("collector.log")).unwrap();
        let child = Command::new(collector_binary())
            .arg("--config")
            .arg(format!("file:{}", config.display()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the collector starts");
        Self { child }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One span as the file exporter wrote it (OTLP/JSON: ids in hex).
#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    attributes: serde_json::Map<String, Value>,
}

impl Span {
    /// An attribute's value as text (OTLP/JSON writes 64-bit integers as strings).
    fn attr(&self, key: &str) -> Option<String> {
        let value = self.attributes.get(key)?;
        let inner = value.as_object()?.values().next()?;
        Some(match inner {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }
}

/// Every span in the collector's file so far.
fn spans(file: &Path) -> Vec<Span> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(export) = serde_json::from_str::<Value>(line) else {
            continue; // a line still being written
        };
        for resource in export["resourceSpans"].as_array().into_iter().flatten() {
            assert_eq!(
                resource["resource"]["attributes"]
                    .as_array()
                    .and_then(|a| a.iter().find(|kv| kv["key"] == "service.name"))
                    .map(|kv| kv["value"]["stringValue"].clone()),
                Some(json!("capy-webhooks")),
                "{resource}"
            );
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                for span in scope["spans"].as_array().into_iter().flatten() {
                    let attributes = span["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|kv| (kv["key"].as_str().unwrap().to_string(), kv["value"].clone()))
                        .collect();
                    out.push(Span {
                        trace_id: span["traceId"].as_str().unwrap_or_default().to_string(),
                        span_id: span["spanId"].as_str().unwrap_or_default().to_string(),
                        parent: span["parentSpanId"].as_str().unwrap_or_default().to_string(),
                        name: span["name"].as_str().unwrap_or_default().to_string(),
                        attributes,
                    });
                }
            }
        }
    }
    out
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

fn operator(ns: &str, dir: &Path, log: &str, ports: (u16, u16, u16), collector_port: u16) -> OperatorProcess {
    let (api, ingest, metrics) = ports;
    let args: Vec<String> = [
        ("--api-listen", format!("127.0.0.1:{api}")),
        ("--ingest-listen", format!("127.0.0.1:{ingest}")),
        ("--metrics-listen", format!("127.0.0.1:{metrics}")),
        ("--otlp-endpoint", format!("http://127.0.0.1:{collector_port}")),
        ("--trace-sampling-ratio", "1".to_string()),
        ("--retry-schedule", "0s,3s".to_string()),
        ("--shutdown-grace", "5s".to_string()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value])
    .collect();
    OperatorProcess::start(ns, &support::kubeconfig_path(), dir, log, &args)
}

/// SIGTERM, and wait for a clean exit (which exports the spans still queued).
fn terminate(op: &mut OperatorProcess) {
    let pid = op.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = op.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn an_events_ingest_and_attempts_before_and_after_a_restart_are_spans_of_the_producers_trace() {
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, "traces").await;
    let dir = tempfile::tempdir().unwrap();
    let collector_port = free_port();
    let file = dir.path().join("spans.jsonl");
    let _collector = Collector::start(dir.path(), collector_port, &file);
    support::wait_for("the collector listens", Duration::from_secs(30), || async {
        std::net::TcpStream::connect(("127.0.0.1", collector_port)).ok()
    })
    .await;

    // The first attempt fails (500), the second, after the restart, succeeds.
    let receiver = Receiver::start(vec![Answer::Status(500)]).await;
    let ports = (free_port(), free_port(), free_port());
    let mut op = operator(&ns, dir.path(), "operator-1.log", ports, collector_port);
    let http = reqwest::Client::new();
    let (_, key) = capy_webhooks::auth::api_keys::create_key(&client, &ns, ORG, None, None)
        .await
        .unwrap();
    // A path and a query that must never reach a span.
    let hook = receiver.url("/hooks/secret-path?token=s3cr3t");
    let endpoint_id = support::process::create_endpoint(&http, ports.0, ORG, &key, &hook).await;

    let (trace_id, producer_span) = (random_hex(16), random_hex(8));
    let res = http
        .post(format!("http://127.0.0.1:{}/v1/organizations/{ORG}/events", ports.1))
        .bearer_auth(INGEST_TOKEN)
        .header("traceparent", format!("00-{trace_id}-{producer_span}-01"))
        .header("tracestate", "producer=1")
        .json(&json!({"type": "database.created", "data": {"name": "orders"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let accepted: Value = res.json().await.unwrap();
    let event_id = accepted["id"].as_str().unwrap().to_string();
    assert_eq!(accepted["deliveries"], 1);

    support::wait_for("the first attempt", Duration::from_secs(30), || async {
        (!receiver.received().is_empty()).then_some(())
    })
    .await;
    // The delivery is pending (its retry in 3 s): stop the operator, start another.
    terminate(&mut op);
    let mut op = operator(&ns, dir.path(), "operator-2.log", ports, collector_port);
    support::wait_for(
        "the second attempt, after the restart",
        Duration::from_secs(60),
        || async { (receiver.received().len() >= 2).then_some(()) },
    )
    .await;
    terminate(&mut op);

    // The receiver never got a trace header.
    for got in receiver.received() {
        for header in ["traceparent", "tracestate", "baggage"] {
            assert!(
                !got.headers.contains_key(header),
                "{header} reached the receiver: {:?}",
                got.headers
            );
        }
    }

    let spans = support::wait_for("the spans in the collector's file", Duration::from_secs(30), || {
        let spans = spans(&file);
        let attempts = spans
            .iter()
            .filter(|s| s.name == "webhook attempt" && s.trace_id == trace_id)
            .count();
        async move { (attempts >= 2).then_some(spans) }
    })
    .await;
    let ours: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let summary = || format!("{ours:#?}");

    // The ingest port's request span continues the producer's span; the ingest span is its child.
    let request = ours
        .iter()
        .find(|s| s.parent == producer_span)
        .unwrap_or_else(|| panic!("no span is a child of the producer's: {}", summary()));
    assert_eq!(request.name, "POST /v1/organizations/:org/events");
    assert_eq!(
        request.attr("http.route").as_deref(),
        Some("/v1/organizations/:org/events")
    );
    assert_eq!(request.attr("http.response.status_code").as_deref(), Some("202"));
    let ingest = ours
        .iter()
        .find(|s| s.name == "ingest")
        .unwrap_or_else(|| panic!("no ingest span in the producer's trace: {}", summary()));
    assert_eq!(ingest.parent, request.span_id);
    assert_eq!(ingest.attr("capy.organization.id").as_deref(), Some(ORG));
    assert_eq!(ingest.attr("capy.event.id").as_deref(), Some(event_id.as_str()));
    assert_eq!(ingest.attr("capy.event.type").as_deref(), Some("database.created"));
    assert_eq!(ingest.attr("capy.endpoints.matched").as_deref(), Some("1"));

    // Both attempts, the one after the restart too, are children of the ingest span.
    let mut attempts: Vec<&&Span> = ours.iter().filter(|s| s.name == "webhook attempt").collect();
    attempts.sort_by_key(|s| s.attr("capy.attempt"));
    assert_eq!(attempts.len(), 2, "{}", summary());
    let delivery_id = receiver.received()[0].header("webhook-id").to_string();
    for (n, (attempt, status)) in attempts.iter().zip(["500", "200"]).enumerate() {
        assert_eq!(attempt.parent, ingest.span_id, "{attempt:?}");
        assert_eq!(attempt.attr("capy.attempt"), Some((n + 1).to_string()));
        assert_eq!(attempt.attr("capy.endpoint.id").as_deref(), Some(endpoint_id.as_str()));
        assert_eq!(attempt.attr("capy.delivery.id").as_deref(), Some(delivery_id.as_str()));
        assert_eq!(attempt.attr("server.address").as_deref(), Some("127.0.0.1"));
        assert_eq!(attempt.attr("http.response.status_code").as_deref(), Some(status));
    }
    assert_eq!(attempts[0].attr("error.type").as_deref(), Some("http_error"));
    assert_eq!(attempts[1].attr("error.type"), None);

    // Nothing of the receiver's path or query, nor any credential, is in any span.
    let everything = format!("{spans:?}");
    for secret in ["secret-path", "s3cr3t", INGEST_TOKEN, key.as_str()] {
        assert!(!everything.contains(secret), "{secret} is in a span");
    }
    // REST requests and log writes are spans too (each its own trace: no traceparent was sent).
    assert!(
        spans
            .iter()
            .any(|s| s.name == "POST /v1/organizations/:org/webhook-endpoints"
                && s.attr("http.response.status_code").as_deref() == Some("201")),
        "no REST request span"
    );
    let write = spans
        .iter()
        .find(|s| s.name == "delivery log write")
        .expect("a log write span");
    assert!(
        write
            .attr("capy.log.records")
            .is_some_and(|n| n.parse::<u64>().unwrap() >= 1),
        "{write:?}"
    );
    assert!(
        write
            .attr("capy.log.bytes")
            .is_some_and(|n| n.parse::<u64>().unwrap() > 0),
        "{write:?}"
    );
    support::delete_namespace(&client, &ns).await;
}

/// A REST request to either of two replicas, one of which owns the organization: the other
/// forwards the work (a test event) over `/internal/v1/work`, and the owner's span of that work is
/// a child of the asking replica's request span, in the caller's trace; the test event's attempt
/// joins the same trace.
#[tokio::test]
async fn forwarded_work_stays_in_the_trace_of_the_request_that_asked_for_it() {
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, "traces-fwd").await;
    let dir = tempfile::tempdir().unwrap();
    let collector_port = free_port();
    let file = dir.path().join("spans.jsonl");
    let _collector = Collector::start(dir.path(), collector_port, &file);
    support::wait_for("the collector listens", Duration::from_secs(30), || async {
        std::net::TcpStream::connect(("127.0.0.1", collector_port)).ok()
    })
    .await;

    let receiver = Receiver::start(vec![]).await;
    let replicas: Vec<(u16, OperatorProcess)> = ["trace-a", "trace-b"]
        .iter()
        .map(|name| {
            let api = free_port();
            let flags = vec![
                ("--api-listen", format!("127.0.0.1:{api}")),
                ("--ingest-listen", format!("127.0.0.1:{}", free_port())),
                ("--metrics-listen", format!("127.0.0.1:{}", free_port())),
                ("--identity", name.to_string()),
                ("--lease-duration", "6s".into()),
                ("--otlp-endpoint", format!("http://127.0.0.1:{collector_port}")),
                ("--trace-sampling-ratio", "1".into()),
                ("--shutdown-grace", "5s".into()),
            ];
            (api, OperatorProcess::start_replica(&ns, dir.path(), name, flags))
        })
        .collect();
    let http = reqwest::Client::new();
    let (_, key) = capy_webhooks::auth::api_keys::create_key(&client, &ns, ORG, None, None)
        .await
        .unwrap();
    let endpoint_id = support::process::create_endpoint(&http, replicas[0].0, ORG, &key, &receiver.url("/t")).await;

    // One test event asked of each replica, each in a trace of its own caller.
    let mut traces = Vec::new();
    for (api, _) in &replicas {
        let (trace_id, caller_span) = (random_hex(16), random_hex(8));
        let url = format!("http://127.0.0.1:{api}/v1/organizations/{ORG}/webhook-endpoints/{endpoint_id}/test");
        support::wait_for("a test event accepted", Duration::from_secs(60), || async {
            let res = http
                .post(&url)
                .bearer_auth(&key)
                .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
                .send()
                .await
                .ok()?;
            (res.status() == 202).then_some(())
        })
        .await;
        traces.push(trace_id);
    }
    support::wait_for("both test events received", Duration::from_secs(30), || async {
        (receiver.received().len() >= 2).then_some(())
    })
    .await;
    for (_, mut process) in replicas {
        terminate(&mut process);
    }

    const WORK: &str = "POST /internal/v1/work";
    // The collector writes what each replica exported at its own pace: wait for the work span and
    // for a span of each caller's trace on the asking side.
    let spans = support::wait_for(
        "the forwarded work's span and its parent",
        Duration::from_secs(30),
        || {
            let spans = spans(&file);
            let written = |s: &Span| s.name == WORK && spans.iter().any(|p| p.span_id == s.parent);
            let complete = spans.iter().any(written);
            async move { complete.then_some(spans) }
        },
    )
    .await;
    let summary = || format!("{spans:#?}");
    // Exactly one of the two requests was forwarded: the one to the replica that does not own
    // the organization.
    let work: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == WORK && traces.contains(&s.trace_id))
        .collect();
    assert_eq!(work.len(), 1, "{}", summary());
    let work = work[0];
    let asked = spans
        .iter()
        .find(|s| s.span_id == work.parent)
        .unwrap_or_else(|| panic!("the work span's parent is not exported: {}", summary()));
    assert_eq!(asked.trace_id, work.trace_id);
    assert_eq!(
        asked.name, "POST /v1/organizations/:org/webhook-endpoints/:id/test",
        "{asked:?}"
    );
    assert_eq!(
        work.attr("http.response.status_code").as_deref(),
        Some("200"),
        "{work:?}"
    );
    // The attempt of the forwarded test event is in the caller's trace too.
    assert!(
        spans
            .iter()
            .any(|s| s.name == "webhook attempt" && s.trace_id == work.trace_id),
        "no attempt in the forwarded request's trace: {}",
        summary()
    );
    support::delete_namespace(&client, &ns).await;
}
