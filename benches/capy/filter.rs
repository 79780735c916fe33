//! Endpoint filters in CEL (README, "Filtering with CEL"): the same burst to the same endpoints,
//! once with no filter and once with a filter on every endpoint, in the same run, with one
//! operator. Every event matches the filter, so both runs make the same deliveries: the
//! difference is what evaluating the filters at ingest costs.

use std::path::Path;

use kube::Client;
use serde_json::json;

use super::{
    ControlPlane, Receiver, create_endpoints, dispatch_burst, mint_key_in, patch_endpoints, scenario_operator, settle,
};

const NS: &str = "bench-filter";

/// Endpoints per organization: every event fans out to each, evaluating each one's filter.
const ENDPOINTS: usize = 4;

/// The filter of every endpoint in the filtered run: reads the type and both fields of the bench's
/// events (`{"seq": N, "blob": "..."}`), and is true for all of them.
const FILTER: &str = "event.type.startsWith('bench.') && event.data.seq >= 0 && event.data.blob.size() > 0";

/// Runs the filter scenario and adds its row.
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
    let mut op = scenario_operator(cp, client, http, workdir, NS, "filter").await;
    let mut results = Vec::new();
    for filtered in [false, true] {
        let org = format!("org_filter_{filtered}");
        let key = mint_key_in(client, http, &op, NS, &org).await;
        create_endpoints(http, &op, &org, &key, &url, ENDPOINTS).await;
        if filtered {
            patch_endpoints(http, &op, &org, &key, &json!({"filter": FILTER})).await;
        }
        let ops = dispatch_burst(http, &op, &org, rx, events, ENDPOINTS as u64).await;
        settle(http, &op).await;
        eprintln!("[bench] filter: filtered={filtered} {ops:.0} deliveries/s");
        results.push(ops);
    }
    op.stop();
    let (none, filtered) = (results[0], results[1]);
    row(
        &format!(
            "Dispatch, a CEL filter on each of {ENDPOINTS} endpoints ({} deliveries, every event matches)",
            events * ENDPOINTS as u64
        ),
        format!("{filtered:.0} deliveries/s"),
        format!("{none:.0}/s with no filter (ratio {:.2})", filtered / none),
        "-",
    );
}
