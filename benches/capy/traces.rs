//! Traces (README, "Traces"): dispatch throughput with every span exported (sampling ratio 1.0,
//! to a real OpenTelemetry Collector built by `hack/otel-collector.sh`) beside the same burst with
//! traces off, in the same run and namespace, each with a fresh operator; off and on alternate over
//! three rounds (one with `--quick`), and the ratio is the median of the rounds' ratios.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use kube::Client;

use super::{
    ControlPlane, Operator, Receiver, create_endpoints, dispatch_burst, free_port, mint_key_in, process_cpu_secs, root,
    settle,
};

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
    let off: Vec<&str> = vec!["--log-write-budget", "0"];
    let mut on = off.clone();
    on.extend(["--otlp-endpoint", endpoint.as_str(), "--trace-sampling-ratio", "1.0"]);
    // Off and on alternate, the order swapped each round, so that neither side always runs
    // second (on a control plane that has grown by the first run's logs); the figure is the
    // median over rounds of the ratio within each round.
    let rounds = if quick { 1 } else { 3 };
    let mut ratios = Vec::new();
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut cpu_per_1000: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        let order: [(usize, &str); 2] = if round % 2 == 0 {
            [(0, "off"), (1, "on")]
        } else {
            [(1, "on"), (0, "off")]
        };
        let mut this_round = [0.0f64; 2];
        for (side, name) in order {
            let flags = if side == 0 { &off } else { &on };
            let mut op = Operator::start_in(
                NS,
                &format!("traces-{name}-{round}"),
                &cp.kubeconfig,
                workdir,
                "10s",
                flags,
                "warn",
            );
            op.wait_ready(http).await;
            let org = format!("org_traces_{name}_{round}");
            let key = mint_key_in(client, http, &op, NS, &org).await;
            create_endpoints(http, &op, &org, &key, &url, n_ep as usize).await;
            let cpu_before = process_cpu_secs(op.child.id()).unwrap_or(0.0);
            let ops = dispatch_burst(http, &op, &org, rx, events, n_ep).await;
            settle(http, &op).await;
            let cpu = process_cpu_secs(op.child.id()).unwrap_or(0.0) - cpu_before;
            let per_1000 = cpu * 1000.0 / (events * n_ep) as f64;
            eprintln!(
                "[bench] traces {name}, round {round}: {ops:.0} deliveries/s, operator {per_1000:.3} CPU-s per 1,000"
            );
            this_round[side] = ops;
            rates[side].push(ops);
            cpu_per_1000[side].push(per_1000);
            op.stop();
        }
        ratios.push(this_round[1] / this_round[0]);
    }
    let spans = std::fs::read_to_string(workdir.join("spans.jsonl"))
        .map(|t| t.matches("\"spanId\"").count())
        .unwrap_or(0);
    let [off_rate, on_rate] = rates.map(median);
    let [off_cpu, on_cpu] = cpu_per_1000.map(median);
    row(
        &format!(
            "Dispatch, {n_ep} endpoints ({} deliveries), traces on (ratio 1.0, {spans} spans exported over {rounds} round(s))",
            events * n_ep
        ),
        format!("{on_rate:.0} deliveries/s (median), operator {on_cpu:.3} CPU-s per 1,000"),
        format!(
            "{off_rate:.0}/s with traces off, operator {off_cpu:.3} CPU-s per 1,000 (ratio {:.3}, median of rounds {})",
            median(ratios.clone()),
            ratios.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(", ")
        ),
        "≥ 90 % of traces off",
    );
}

/// The median of a few figures (the mean of the middle two for an even count).
fn median(mut figures: Vec<f64>) -> f64 {
    figures.sort_by(f64::total_cmp);
    let n = figures.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => figures[n / 2],
        _ => (figures[n / 2 - 1] + figures[n / 2]) / 2.0,
    }
}
