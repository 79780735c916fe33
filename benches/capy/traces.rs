//! Traces (README, "Traces"): dispatch throughput with every span exported (sampling ratio 1.0,
//! to a real OpenTelemetry Collector built by `hack/otel-collector.sh`) beside the same burst with
//! traces off, in the same run and namespace, each with a fresh operator.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use kube::Client;

use super::{ControlPlane, Operator, Receiver, create_endpoints, dispatch_burst, free_port, mint_key_in, root, settle};

const NS: &str = "bench-traces";

/// The collector, writing what it receives to a file in `workdir` (deleted with it).
struct Collector(Child);

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn collector(workdir: &Path, port: u16) -> Collector {
    let binary = match std::env::var("CAPY_OTELCOL") {
        Ok(path) if !path.is_empty() => path,
        _ => {
            let out = Command::new(root().join("hack/otel-collector.sh"))
                .stderr(Stdio::inherit())
                .output()
                .expect("hack/otel-collector.sh runs");
            assert!(out.status.success(), "building the collector failed");
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .last()
                .unwrap()
                .trim()
                .to_string()
        }
    };
    let config = workdir.join("collector.yaml");
    std::fs::write(
        &config,
        format!(
            "receivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: 127.0.0.1:{port}\n\
             exporters:\n  file:\n    path: {}\n\
             service:\n  telemetry:\n    metrics:\n      level: none\n  pipelines:\n    traces:\n      \
             receivers: [otlp]\n      exporters: [file]\n",
            workdir.join("spans.jsonl").display()
        ),
    )
    .unwrap();
    let child = Command::new(binary)
        .arg("--config")
        .arg(format!("file:{}", config.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(workdir.join("collector.log")).unwrap())
        .spawn()
        .expect("the collector starts");
    Collector(child)
}

/// Runs the traces scenario and adds its rows.
pub(super) async fn run(
    cp: &ControlPlane,
    client: &Client,
    http: &reqwest::Client,
    rx: &Receiver,
    workdir: &Path,
    quick: bool,
    row: &impl Fn(&str, String, String, &str),
) {
    super::create_namespace(client, NS).await;
    let port = free_port();
    let _collector = collector(workdir, port);
    let endpoint = format!("http://127.0.0.1:{port}");
    let n_ep = 10u64;
    let events = if quick { 400 } else { 4000 };
    let url = format!("{}/deliver", rx.addr);
    let mut results = Vec::new();
    for (name, extra) in [
        ("off", vec!["--log-write-budget", "0"]),
        (
            "on",
            vec![
                "--log-write-budget",
                "0",
                "--otlp-endpoint",
                endpoint.as_str(),
                "--trace-sampling-ratio",
                "1.0",
            ],
        ),
    ] {
        let mut op = Operator::start_in(
            NS,
            &format!("traces-{name}"),
            &cp.kubeconfig,
            workdir,
            "10s",
            &extra,
            "warn",
        );
        op.wait_ready(http).await;
        let org = format!("org_traces_{name}");
        let key = mint_key_in(client, http, &op, NS, &org).await;
        create_endpoints(http, &op, &org, &key, &url, n_ep as usize).await;
        let ops = dispatch_burst(http, &op, &org, rx, events, n_ep).await;
        settle(http, &op).await;
        eprintln!("[bench] traces {name}: {ops:.0} deliveries/s");
        results.push(ops);
        op.stop();
    }
    let spans = std::fs::read_to_string(workdir.join("spans.jsonl"))
        .map(|t| t.matches("\"spanId\"").count())
        .unwrap_or(0);
    let (off, on) = (results[0], results[1]);
    row(
        &format!(
            "Dispatch, {n_ep} endpoints ({} deliveries), traces on (ratio 1.0, {spans} spans exported)",
            events * n_ep
        ),
        format!("{on:.0} deliveries/s"),
        format!("{off:.0}/s with traces off (ratio {:.2})", on / off),
        "≥ 90 % of traces off",
    );
}
