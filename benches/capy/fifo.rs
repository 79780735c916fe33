//! Ordered endpoints (README, "fifo"): one endpoint with `ordering: "fifo"` (one attempt in flight,
//! in ingest order) beside one unordered endpoint, the same burst to the same receiver, in the same
//! run, with one operator.

use std::path::Path;

use kube::Client;
use serde_json::json;

use super::{
    ControlPlane, Receiver, create_endpoints, dispatch_burst, mint_key_in, patch_endpoints, scenario_operator, settle,
};

const NS: &str = "bench-fifo";

/// Runs the fifo scenario and adds its row.
pub(super) async fn run(
    cp: &ControlPlane,
    client: &Client,
    http: &reqwest::Client,
    rx: &Receiver,
    workdir: &Path,
    quick: bool,
    row: &impl Fn(&str, String, String, &str),
) {
    let events = if quick { 400 } else { 4000 };
    let url = format!("{}/deliver", rx.addr);
    let mut op = scenario_operator(cp, client, http, workdir, NS, "fifo").await;
    let mut results = Vec::new();
    for ordering in ["unordered", "fifo"] {
        let org = format!("org_fifo_{ordering}");
        let key = mint_key_in(client, http, &op, NS, &org).await;
        create_endpoints(http, &op, &org, &key, &url, 1).await;
        if ordering == "fifo" {
            patch_endpoints(http, &op, &org, &key, &json!({"ordering": "fifo"})).await;
        }
        let ops = dispatch_burst(http, &op, &org, rx, events, 1).await;
        settle(http, &op).await;
        eprintln!("[bench] fifo: {ordering} {ops:.0} deliveries/s");
        results.push(ops);
    }
    op.stop();
    let (unordered, fifo) = (results[0], results[1]);
    row(
        &format!("Dispatch, 1 fifo endpoint ({events} deliveries, one attempt in flight, in ingest order)"),
        format!("{fifo:.0} deliveries/s"),
        format!(
            "{unordered:.0}/s to an unordered endpoint (ratio {:.2})",
            fifo / unordered
        ),
        "-",
    );
}
