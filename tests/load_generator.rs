//! The load generator a peer is measured with (`benches/loadgen.rs`, `cargo bench --bench load`):
//! its templates and tally as pure functions, and the whole loop against the operator's ingest on
//! a real control plane, as BENCHMARKS.md tells a reader to run it against another system.

#[path = "../benches/loadgen.rs"]
mod loadgen;
mod support;

use std::time::{Duration, Instant};

use loadgen::{BodyTemplate, Load, Tally, TallyingReceiver};
use support::operator::{INGEST_TOKEN, Options};

#[test]
fn a_template_fills_its_placeholders_and_names_a_bad_one() {
    let t =
        BodyTemplate::parse(r#"{"eventType":"bench.event","n":{{seq}},"payload":{{data}},"b":"{{ blob }}"}"#).unwrap();
    let body: serde_json::Value = serde_json::from_str(&t.render(7)).unwrap();
    assert_eq!(body["n"], 7);
    assert_eq!(body["payload"], loadgen::payload(7));
    assert_eq!(body["b"], loadgen::blob(7));
    assert_ne!(loadgen::blob(7), loadgen::blob(8), "every event's blob differs");
    assert_eq!(BodyTemplate::parse("plain").unwrap().render(1), "plain");
    let unknown = BodyTemplate::parse("{{id}}").unwrap_err();
    assert!(unknown.contains("{{id}}"), "{unknown}");
    let unclosed = BodyTemplate::parse("ab{{seq").unwrap_err();
    assert!(unclosed.contains("byte 2"), "{unclosed}");
    // The ingest template makes the body capy-webhooks' ingest takes, about 539 bytes.
    let ingest = BodyTemplate::parse(loadgen::INGEST_BODY).unwrap().render(3);
    let ingest: serde_json::Value = serde_json::from_str(&ingest).unwrap();
    assert_eq!(ingest["type"], "bench.event");
    assert_eq!(ingest["data"]["seq"], 3);
}

#[test]
fn the_tally_counts_each_delivery_once_per_endpoint() {
    let mut tally = Tally::default();
    let now = Instant::now();
    assert!(tally.record("/ep0", Some("msg_1"), now));
    assert!(
        tally.record("/ep1", Some("msg_1"), now),
        "the same id at another endpoint is another delivery"
    );
    assert!(!tally.record("/ep0", Some("msg_1"), now), "a repeat");
    assert!(!tally.record("/ep0", None, now));
    assert!(tally.record("/ep0", Some("msg_2"), now));
    assert_eq!(
        (
            tally.unique(),
            tally.duplicates(),
            tally.without_id(),
            tally.endpoints()
        ),
        (3, 1, 1, 2)
    );
    assert_eq!(tally.per_endpoint_range(), (1, 2));
    assert_eq!(
        loadgen::parse_header("Authorization: Bearer k:1").unwrap(),
        ("Authorization".into(), "Bearer k:1".into())
    );
    assert!(loadgen::parse_header("no colon").is_err());
    assert!(loadgen::parse_header(": v").is_err());
}

/// The generator drives the operator's ingest as it would drive another server: every event
/// accepted, every delivery counted once at each of the two endpoints, no duplicates.
#[tokio::test]
async fn the_load_generator_measures_the_operator_end_to_end() {
    const ORG: &str = "org_load";
    const EVENTS: u64 = 50;
    let (client, ns, op) = support::operator::in_new_namespace("load", Options::dispatching()).await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    let receiver = TallyingReceiver::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    for endpoint in ["/ep0", "/ep1"] {
        op.create_endpoint(ORG, &key, &format!("{}{endpoint}", receiver.url))
            .await;
    }
    support::wait_for(
        "both endpoints known to the operator",
        Duration::from_secs(30),
        || async {
            let (_, body, _) = op.call("GET", &op.url(ORG, ""), Some(&key), None).await;
            (body["webhook_endpoints"].as_array()?.len() == 2).then_some(())
        },
    )
    .await;
    let load = Load {
        url: format!("{}/v1/organizations/{ORG}/events", op.ingest_base),
        headers: vec![("Authorization".into(), format!("Bearer {INGEST_TOKEN}"))],
        body: BodyTemplate::parse(loadgen::INGEST_BODY).unwrap(),
        events: EVENTS,
        first_seq: 0,
        concurrency: 8,
    };
    let sent = loadgen::send(&reqwest::Client::new(), &load).await;
    assert_eq!(sent.accepted, EVENTS);
    assert!(
        receiver.wait_unique(EVENTS * 2, Duration::from_secs(60)).await,
        "every delivery arrives"
    );
    // Late repeats, if any, arrive within the attempt timeout.
    tokio::time::sleep(Duration::from_secs(1)).await;
    receiver.with_tally(|t| {
        assert_eq!(t.duplicates(), 0);
        assert_eq!(t.without_id(), 0, "every delivery carries webhook-id");
        assert_eq!(t.endpoints(), 2);
        let (fewest, most) = t.per_endpoint_range();
        assert_eq!(fewest, most, "both endpoints got every event");
    });
    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}
