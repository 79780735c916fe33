//! Tenancy through Kubernetes objects: no path from one organization to another, however the
//! objects were made. Real API server, real operator components, real receivers on loopback.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use capy_webhooks::delivery_log::DeliveryRecord;
use capy_webhooks::resources::{CONDITION_READY, ORGANIZATION_LABEL, WebhookEndpoint, WebhookEndpointSpec};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::operator::{Operator, Options};
use support::receiver::Receiver;

const VICTIM: &str = "org_victim";
const WAIT: Duration = Duration::from_secs(30);

fn endpoint(name: &str, org: &str, url: &str) -> WebhookEndpoint {
    WebhookEndpoint::new(
        name,
        WebhookEndpointSpec {
            organization_id: org.into(),
            url: url.into(),
            description: "spoof".into(),
            event_types: vec![],
            active: true,
            secret_rotation: 0,
            max_attempts: None,
            headers: Default::default(),
            rate_limit: None,
            signature_scheme: Default::default(),
            ordering: Default::default(),
            filter: None,
            client_certificate: None,
        },
    )
}

fn ready_reason(ep: &WebhookEndpoint) -> Option<(String, String)> {
    let status = ep.status.as_ref()?;
    (status.observed_generation == ep.metadata.generation).then_some(())?;
    let ready = status.conditions.iter().find(|c| c.type_ == CONDITION_READY)?;
    Some((ready.status.clone(), ready.reason.clone()))
}

/// A pending delivery record as a log segment stores it, for segments the tests write by hand.
fn pending_record(id: &str, endpoint: &str, org: &str, event_id: &str, event_type: &str) -> DeliveryRecord {
    DeliveryRecord::pending(
        id.into(),
        endpoint,
        org,
        (event_id, event_type),
        3,
        jiff::Timestamp::now(),
    )
}

async fn label_namespace(client: &kube::Client, ns: &str, org: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {ORGANIZATION_LABEL: org}}})),
        )
        .await
        .unwrap();
}

/// Someone who may create endpoints in their own namespace names another organization: the
/// endpoint gets no secret, no deliveries and shows in no REST answer until the platform team
/// binds the namespace to that organization.
#[tokio::test]
async fn an_endpoint_in_an_unbound_namespace_cannot_serve_another_organization() {
    let client = support::client().await;
    support::install_crd(&client).await;
    let home = support::test_namespace(&client, "tenancy-home").await;
    let spoof = support::test_namespace(&client, "tenancy-spoof").await;
    let op = Operator::start(
        &client,
        &spoof,
        Options {
            dispatcher: true,
            home_namespace: Some(home.clone()),
            ..Options::default()
        },
    )
    .await;
    let (_, key) = op.mint_key(&client, &home, VICTIM, None).await;
    let receiver = Receiver::start(vec![]).await;

    let endpoints: Api<WebhookEndpoint> = Api::namespaced(client.clone(), &spoof);
    endpoints
        .create(
            &PostParams::default(),
            &endpoint("spy", VICTIM, &receiver.url("/stolen")),
        )
        .await
        .unwrap();
    support::wait_for("spy refused", WAIT, || async {
        let ep = endpoints.get("spy").await.unwrap();
        (ready_reason(&ep) == Some(("False".into(), "OrganizationNotAllowed".into()))).then_some(())
    })
    .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &spoof);
    assert!(
        secrets.get_opt("spy-signing").await.unwrap().is_none(),
        "no signing Secret"
    );
    let events: Api<K8sEvent> = Api::namespaced(client.clone(), &spoof);
    let refused = events.list(&ListParams::default()).await.unwrap().items;
    assert!(
        refused
            .iter()
            .any(|e| e.reason.as_deref() == Some("OrganizationNotAllowed")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("spy")),
        "a Warning Event tells the endpoint's owner why"
    );

    // Not in the victim's REST answers, not found by id, and no delivery.
    let (status, list, _) = op.call("GET", &op.url(VICTIM, ""), Some(&key), None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["webhook_endpoints"], json!([]), "{list}");
    let (status, body, _) = op
        .call(
            "PATCH",
            &op.url(VICTIM, "/spy"),
            Some(&key),
            Some(json!({"description": "mine"})),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body, _) = op
        .call("GET", &op.url(VICTIM, "/spy/deliveries"), Some(&key), None)
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, accepted) = op.ingest(VICTIM, "secret.created", json!({"n": 1})).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["deliveries"], 0, "no delivery goes to the spy: {accepted}");

    // Bound to another organization: still refused.
    label_namespace(&client, &spoof, "org_someone_else").await;
    let (_, accepted) = op.ingest(VICTIM, "secret.created", json!({"n": 2})).await;
    assert_eq!(accepted["deliveries"], 0, "{accepted}");

    // The platform team binds the namespace to the organization: now it serves it (the refusal
    // above was the binding, not a broken endpoint).
    label_namespace(&client, &spoof, VICTIM).await;
    support::wait_for("spy admitted", WAIT, || async {
        let ep = endpoints.get("spy").await.unwrap();
        (ready_reason(&ep) == Some(("True".into(), "Reconciled".into()))).then_some(())
    })
    .await;
    let (status, list, _) = op.call("GET", &op.url(VICTIM, ""), Some(&key), None).await;
    assert_eq!(status, 200);
    assert_eq!(list["webhook_endpoints"][0]["id"], "spy", "{list}");
    let (status, accepted) = op.ingest(VICTIM, "secret.created", json!({"n": 3})).await;
    assert_eq!(
        (status.as_u16(), accepted["deliveries"].as_u64()),
        (202, Some(1)),
        "{accepted}"
    );
    let got = support::wait_for("the bound endpoint's delivery", WAIT, || async {
        let got = receiver.received();
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].json()["data"]["n"],
        3,
        "only the event sent after the binding arrives"
    );

    op.stop().await;
    support::delete_namespace(&client, &spoof).await;
    support::delete_namespace(&client, &home).await;
}

/// A namespace's binding that flaps loses nothing: while the organization label is off, the
/// namespace's endpoints are paused (no delivery goes out, none is dropped); once it is back,
/// every delivery already answered 202 arrives. Only deleting the endpoint drops its deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_that_flaps_loses_no_acknowledged_delivery() {
    use support::receiver::Answer;
    const ORG: &str = "org_flapping";
    const EVENTS: usize = 6;
    let client = support::client().await;
    support::install_crd(&client).await;
    let home = support::test_namespace(&client, "flap-home").await;
    let tenant = support::test_namespace(&client, "flap-tenant").await;
    label_namespace(&client, &tenant, ORG).await;
    let op = Operator::start(
        &client,
        &tenant,
        Options {
            home_namespace: Some(home.clone()),
            schedule: "0s,3s,3s,3s,3s,3s,3s,3s,3s,3s",
            ..Options::dispatching()
        },
    )
    .await;
    let (_, key) = op.mint_key(&client, &home, ORG, None).await;
    // Every first attempt fails: the deliveries are pending, retried every 3 s.
    let receiver = Receiver::start(vec![Answer::Status(503); EVENTS]).await;
    let endpoints: Api<WebhookEndpoint> = Api::namespaced(client.clone(), &tenant);
    endpoints
        .create(&PostParams::default(), &endpoint("flapper", ORG, &receiver.url("/in")))
        .await
        .unwrap();
    support::wait_for("the endpoint ready", WAIT, || async {
        let ep = endpoints.get("flapper").await.unwrap();
        (ready_reason(&ep) == Some(("True".into(), "Reconciled".into()))).then_some(())
    })
    .await;
    for n in 0..EVENTS {
        let (status, body) = op.ingest(ORG, "flap.probe", json!({"n": n})).await;
        assert_eq!((status.as_u16(), body["deliveries"].as_u64()), (202, Some(1)), "{body}");
    }
    support::wait_for("every first attempt refused", WAIT, || async {
        (receiver.received().len() >= EVENTS).then_some(())
    })
    .await;

    // The label goes for 5 s: the operator sees the endpoint unbound (out of REST answers).
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            &tenant,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {ORGANIZATION_LABEL: null}}})),
        )
        .await
        .unwrap();
    support::wait_for("the endpoint unbound", WAIT, || async {
        let (_, list, _) = op.call("GET", &op.url(ORG, ""), Some(&key), None).await;
        (list["webhook_endpoints"] == json!([])).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    label_namespace(&client, &tenant, ORG).await;

    let delivered = support::wait_for(
        "every acknowledged delivery, after the binding returned",
        WAIT,
        || async {
            let ok: std::collections::BTreeSet<u64> = receiver
                .received()
                .iter()
                .skip(EVENTS)
                .filter_map(|r| r.json()["data"]["n"].as_u64())
                .collect();
            (ok.len() == EVENTS).then_some(ok)
        },
    )
    .await;
    assert_eq!(delivered, (0..EVENTS as u64).collect());
    op.stop().await;
    support::delete_namespace(&client, &tenant).await;
    support::delete_namespace(&client, &home).await;
}

/// One endpoint that cannot keep up (`rate_limit: 1`) fills its backlog: the organization's
/// events are still accepted, its other endpoint gets every one, and the slow endpoint's extra
/// deliveries are stored `failed` with a `last_error` that says why (recoverable later), counted,
/// and told with a Warning Event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_never_holds_back_its_organization() {
    use capy_webhooks::delivery_log::{BACKLOG_FULL_ERROR, LogConfig};
    const ORG: &str = "org_slow_and_fast";
    const EVENTS: usize = 40;
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, "backlog").await;
    let op = Operator::start(
        &client,
        &ns,
        Options {
            // 32 KiB per endpoint: about a dozen of the 2 KiB events below.
            log: LogConfig {
                segment_bytes: 16 * 1024,
                max_segments: 4,
                ..LogConfig::default()
            },
            ..Options::dispatching()
        },
    )
    .await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    let (slow, fast) = (Receiver::start(vec![]).await, Receiver::start(vec![]).await);
    let endpoints: Api<WebhookEndpoint> = Api::namespaced(client.clone(), &ns);
    let mut paced = endpoint("slow", ORG, &slow.url("/in"));
    paced.spec.rate_limit = Some(1);
    for ep in [paced, endpoint("fast", ORG, &fast.url("/in"))] {
        endpoints.create(&PostParams::default(), &ep).await.unwrap();
    }
    for name in ["slow", "fast"] {
        support::wait_for("the endpoints ready", WAIT, || async {
            let ep = endpoints.get(name).await.unwrap();
            (ready_reason(&ep) == Some(("True".into(), "Reconciled".into()))).then_some(())
        })
        .await;
    }
    // Incompressible, as the log stores payloads compressed.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let filler: String = (0..2048)
        .map(|_| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            char::from(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[(seed >> 58) as usize % 62])
        })
        .collect();
    for n in 0..EVENTS {
        let (status, body) = op.ingest(ORG, "backlog.probe", json!({"n": n, "filler": filler})).await;
        assert_eq!(
            (status.as_u16(), body["deliveries"].as_u64()),
            (202, Some(2)),
            "event {n}: {body}"
        );
    }
    support::wait_for("every event at the endpoint that keeps up", WAIT, || async {
        (fast.received().len() >= EVENTS).then_some(())
    })
    .await;
    let (status, listed, _) = op
        .call("GET", &op.url(ORG, "/slow/deliveries?limit=100"), Some(&key), None)
        .await;
    assert_eq!(status, 200, "{listed}");
    let deliveries = listed["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), EVENTS, "one delivery per event, none lost: {listed}");
    let overflowed = deliveries
        .iter()
        .filter(|d| d["state"] == "failed" && d["last_error"] == BACKLOG_FULL_ERROR)
        .count();
    assert!(
        overflowed > 0 && overflowed < EVENTS,
        "some deliveries stored failed for the full backlog, not all: {overflowed}"
    );
    let metrics = op.metrics.encode();
    assert!(
        metrics.contains(&format!("capy_webhooks_endpoint_backlog_overflows_total {overflowed}")),
        "{metrics}"
    );
    support::wait_for("a Warning Event on the slow endpoint", WAIT, || async {
        let events: Api<K8sEvent> = Api::namespaced(client.clone(), &ns);
        let all = events.list(&ListParams::default()).await.ok()?.items;
        all.iter()
            .any(|e| {
                e.reason.as_deref() == Some("BacklogFull")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("slow")
            })
            .then_some(())
    })
    .await;
    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}

/// A log segment the operator deleted, re-created byte for byte by someone who copied it (its MAC
/// is valid), is a replay: its superseded pending record is never read back, so the delivery is
/// not sent again after a restart, and the copy is deleted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_segment_created_again_is_not_replayed() {
    use capy_webhooks::delivery_log::{LogConfig, journal_segment_name};
    use k8s_openapi::api::core::v1::ConfigMap;
    use support::receiver::Answer;
    const ORG: &str = "org_replayed";
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, "replay").await;
    let options = || Options {
        schedule: "0s,1s,1s",
        // Small segments and one finished delivery kept: the first segment soon holds nothing
        // live, and the first delivery's every copy goes.
        log: LogConfig {
            max_finished: 1,
            segment_bytes: 1024,
            max_segments: 4,
        },
        ..Options::dispatching()
    };
    let mut op = Operator::start(&client, &ns, options()).await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    // The first event's first attempt fails: segment 1 holds its delivery pending.
    let receiver = Receiver::start(vec![Answer::Status(503)]).await;
    op.create_endpoint(ORG, &key, &receiver.url("/in")).await;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let first = journal_segment_name(ORG, 1);
    let (status, body) = op.ingest(ORG, "replay.first", json!({"n": 0})).await;
    assert_eq!(status, 202, "{body}");
    let copy = support::wait_for("segment 1 written", WAIT, || async {
        configmaps.get_opt(&first).await.ok()?
    })
    .await;
    support::wait_for("the first delivery succeeded on its retry", WAIT, || async {
        (receiver.received().len() >= 2).then_some(())
    })
    .await;
    // More events until segment 1 is deleted and a newer segment's floor is above it.
    let mut n = 1;
    support::wait_for(
        "segment 1 deleted and a floor above it",
        Duration::from_secs(60),
        || {
            n += 1;
            let (op, configmaps, first) = (&op, &configmaps, &first);
            async move {
                op.ingest(ORG, "replay.later", json!({ "n": n })).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                configmaps.get_opt(first).await.ok()?.is_none().then_some(())?;
                let segments = configmaps.list(&ListParams::default()).await.ok()?.items;
                segments
                    .iter()
                    .any(|cm| {
                        cm.data
                            .as_ref()
                            .and_then(|d| d.get("floor"))
                            .and_then(|f| f.parse::<u64>().ok())
                            > Some(1)
                    })
                    .then_some(())
            }
        },
    )
    .await;
    op.stop().await;
    let sent_before = receiver.received().len();

    // The copy comes back, and the operator restarts.
    let mut replayed = copy.clone();
    replayed.metadata.resource_version = None;
    replayed.metadata.uid = None;
    replayed.metadata.creation_timestamp = None;
    replayed.metadata.managed_fields = None;
    configmaps.create(&PostParams::default(), &replayed).await.unwrap();
    op = Operator::start(&client, &ns, options()).await;
    support::wait_for("the replayed segment deleted again", WAIT, || async {
        configmaps.get_opt(&first).await.ok()?.is_none().then_some(())
    })
    .await;
    let (status, _) = op.ingest(ORG, "replay.after", json!({"n": -1})).await;
    assert_eq!(status, 202);
    support::wait_for("the event after the restart", WAIT, || async {
        receiver
            .received()
            .iter()
            .any(|r| r.json()["type"] == "replay.after")
            .then_some(())
    })
    .await;
    let first_sends = receiver
        .received()
        .iter()
        .filter(|r| r.json()["type"] == "replay.first")
        .count();
    assert_eq!(
        first_sends, 2,
        "the first delivery was sent again from the replayed segment"
    );
    assert_eq!(receiver.received().len(), sent_before + 1);
    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}

/// Creating the log key blesses nothing: a segment without a MAC (as a build before MACs wrote,
/// or a forger before an install) stays untrusted however the operator starts. Upgrading such a
/// log is the administrator's explicit step, `capy-webhooks delivery-log sign-unsigned`, which
/// says what it signed; the pending delivery then resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_administrator_signs_segments_written_before_macs() {
    use capy_webhooks::delivery_log::{journal_segment_name, pack_entries, segment_labels};
    use k8s_openapi::api::core::v1::ConfigMap;
    use std::collections::BTreeMap;

    const ORG: &str = "org_upgraded";
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, "sign-unsigned").await;
    let op = Operator::start(&client, &ns, Options::dispatching()).await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    let receiver = Receiver::start(vec![]).await;
    let id = op.create_endpoint(ORG, &key, &receiver.url("/in")).await;
    op.stop().await;

    let record = pending_record(
        "msg_unsigned0000000000000001",
        &id,
        ORG,
        "evt_unsigned0000000000000001",
        "old.event",
    );
    let name = journal_segment_name(ORG, 1);
    let old: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": segment_labels(ORG)},
        "binaryData": {"journal": pack_entries(&BTreeMap::from([
            (record.id.clone(), record.to_stored()),
            (record.event_id.clone(), json!({"type": "old.event", "data": {"n": 0}}).to_string()),
        ]))},
    }))
    .unwrap();
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    configmaps.create(&PostParams::default(), &old).await.unwrap();

    // The operator starts (its start reads the logs back): the segment is refused, not signed,
    // and its delivery not sent.
    let op = Operator::start(&client, &ns, Options::dispatching()).await;
    assert!(
        op.metrics
            .encode()
            .contains("capy_webhooks_log_segments_rejected_total 1")
    );
    assert!(receiver.received().is_empty());
    let still = configmaps.get(&name).await.unwrap();
    assert!(
        !still
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("webhooks.capydb.io/log-mac"),
        "the operator signed a segment it did not write"
    );
    op.stop().await;

    // The administrator's step, as the README gives it (the operator stopped first, so that no
    // segment of the new version is written above the old ones).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capy-webhooks"))
        .args(["delivery-log", "sign-unsigned", "--namespace", &ns])
        .env("KUBECONFIG", support::kubeconfig_path())
        .output()
        .unwrap();
    let stdout = support::ok("delivery-log sign-unsigned", out);
    assert_eq!(stdout.trim(), format!("{ns}/{name}"));

    let op = Operator::start(&client, &ns, Options::dispatching()).await;
    support::wait_for("the signed segment's delivery resumed", WAIT, || async {
        receiver
            .received()
            .iter()
            .any(|r| r.json()["type"] == "old.event")
            .then_some(())
    })
    .await;
    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}

/// A ConfigMap that carries the delivery log's labels but that the operator did not write: its
/// pending record is never delivered nor listed, before or after a restart, and its owner is told.
#[tokio::test]
async fn a_forged_log_segment_is_never_delivered_or_listed() {
    use capy_webhooks::delivery_log::{journal_segment_name, legacy_segment_name, pack_entries};
    use k8s_openapi::api::core::v1::ConfigMap;
    use std::collections::BTreeMap;

    const ORG: &str = "org_forged";
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, "forged-log").await;
    let opts = || Options {
        dispatcher: true,
        ..Options::default()
    };
    let op = Operator::start(&client, &ns, opts()).await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    let receiver = Receiver::start(vec![]).await;
    let id = op.create_endpoint(ORG, &key, &receiver.url("/in")).await;
    let (status, _) = op.ingest(ORG, "real.one", json!({"n": 1})).await;
    assert_eq!(status, 202);

    // The forger writes a pending delivery for that endpoint, in both stored formats.
    let record = pending_record(
        "msg_forged000000000000000001",
        &id,
        ORG,
        "evt_forged000000000000000001",
        "forged.event",
    );
    let now = record.created_at;
    let labels = BTreeMap::from([
        ("app.kubernetes.io/managed-by".to_string(), "capy-webhooks".to_string()),
        ("app.kubernetes.io/component".to_string(), "delivery-log".to_string()),
        ("webhooks.capydb.io/organization-id".to_string(), ORG.to_string()),
    ]);
    let journal: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": journal_segment_name(ORG, 900), "labels": labels},
        "binaryData": {"journal": pack_entries(&BTreeMap::from([
            (record.id.clone(), record.to_stored()),
            (record.event_id.clone(), json!({"stolen": true}).to_string()),
        ]))},
    }))
    .unwrap();
    let legacy_record = json!({
        "id": "msg_forged000000000000000002", "endpoint_id": id, "organization_id": ORG,
        "event_id": "evt_forged000000000000000002", "event_type": "forged.event", "payload": {"stolen": true},
        "state": "pending", "attempts": 0, "max_attempts": 3,
        "created_at": now.to_string(), "updated_at": now.to_string(), "next_attempt_at": now.to_string(),
    });
    let legacy: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": legacy_segment_name(&id, 1), "labels": labels},
        "data": {"msg_forged000000000000000002": legacy_record.to_string()},
    }))
    .unwrap();
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    for cm in [&journal, &legacy] {
        configmaps.create(&PostParams::default(), cm).await.unwrap();
    }

    // A process without a dispatcher reads the log through a watch: the forgery is not listed.
    let reader = Operator::start(
        &client,
        &ns,
        Options {
            controller: false,
            ..Options::default()
        },
    )
    .await;
    let listed = support::wait_for("the real delivery through the watch", WAIT, || async {
        let (status, body, _) = reader
            .call("GET", &reader.url(ORG, &format!("/{id}/deliveries")), Some(&key), None)
            .await;
        let deliveries = body["deliveries"].as_array().cloned().unwrap_or_default();
        (status == 200 && !deliveries.is_empty()).then_some(deliveries)
    })
    .await;
    assert!(
        listed
            .iter()
            .all(|d| !d["id"].as_str().unwrap().starts_with("msg_forged")),
        "{listed:?}"
    );
    reader.stop().await;

    // Restart: the new dispatcher reads every segment back and refuses both forgeries.
    op.stop().await;
    let op = Operator::start(&client, &ns, opts()).await;
    let (status, _) = op.ingest(ORG, "real.two", json!({"n": 2})).await;
    assert_eq!(status, 202);
    support::wait_for("the event sent after the restart", WAIT, || async {
        receiver
            .received()
            .iter()
            .any(|r| r.json()["type"] == "real.two")
            .then_some(())
    })
    .await;
    let ids: Vec<String> = receiver
        .received()
        .iter()
        .map(|r| r.header("webhook-id").to_string())
        .collect();
    assert!(
        ids.iter().all(|i| !i.starts_with("msg_forged")),
        "a forged delivery was sent: {ids:?}"
    );
    assert!(
        receiver
            .received()
            .iter()
            .all(|r| r.json()["data"].get("stolen").is_none())
    );
    let (_, body, _) = op
        .call("GET", &op.url(ORG, &format!("/{id}/deliveries")), Some(&key), None)
        .await;
    let listed = body["deliveries"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{body}");
    assert!(
        listed
            .iter()
            .all(|d| !d["id"].as_str().unwrap().starts_with("msg_forged")),
        "{body}"
    );
    let rejected = op
        .metrics
        .encode()
        .lines()
        .find_map(|l| {
            l.strip_prefix("capy_webhooks_log_segments_rejected_total ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    assert_eq!(rejected.trim(), "2", "both forgeries are counted");
    let events: Api<K8sEvent> = Api::namespaced(client.clone(), &ns);
    support::wait_for("a LogSegmentRejected Event on the endpoint", WAIT, || async {
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("LogSegmentRejected")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(id.as_str())
            })
            .then_some(())
    })
    .await;
    // The forger's objects are left alone, never written into.
    let still = configmaps.get(&journal_segment_name(ORG, 900)).await.unwrap();
    assert!(still.metadata.annotations.unwrap_or_default().is_empty());
    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}

/// Plain ConfigMaps created ahead under the names the delivery log will use next (any tenant
/// who can create ConfigMaps in the namespace could): they are not a second writer, so the log
/// moves on to the next free name, delivers, and never writes into nor deletes them.
#[tokio::test]
async fn configmaps_squatting_the_next_segment_names_neither_stall_the_log_nor_get_deleted() {
    use capy_webhooks::delivery_log::journal_segment_name;
    use k8s_openapi::api::core::v1::ConfigMap;

    const ORG: &str = "org_squatted";
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, "squatted-log").await;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let squatted: Vec<String> = (1..=2).map(|seq| journal_segment_name(ORG, seq)).collect();
    for name in &squatted {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": name},
            "data": {"mine": "not yours"},
        }))
        .unwrap();
        configmaps.create(&PostParams::default(), &cm).await.unwrap();
    }
    let op = Operator::start(&client, &ns, Options::dispatching()).await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    let receiver = Receiver::start(vec![]).await;
    op.create_endpoint(ORG, &key, &receiver.url("/in")).await;

    // The first write meets the squatters: the caller may see 503, but what was queued is
    // written under the next free name and delivered.
    let (status, body) = op.ingest(ORG, "first.one", json!({"n": 1})).await;
    assert!(status == 202 || status == 503, "{status} {body}");
    support::wait_for("the first event, written past the squatted names", WAIT, || async {
        receiver
            .received()
            .iter()
            .any(|r| r.json()["type"] == "first.one")
            .then_some(())
    })
    .await;
    for n in 2..=4 {
        let (status, body) = op.ingest(ORG, "later.one", json!({"n": n})).await;
        assert_eq!(status, 202, "{body}");
    }
    support::wait_for("every later event", WAIT, || async {
        let later = receiver
            .received()
            .iter()
            .filter(|r| r.json()["type"] == "later.one")
            .count();
        (later == 3).then_some(())
    })
    .await;
    // Superseded segments are deleted on the writes after a delivery finishes. Rather than wait a
    // while and find the squatters still there (which a slow delete would also show), wait for the
    // deletes to happen: more events until the lowest of the log's own segments (labelled, just
    // above the squatted names) is gone. Each event is delivered before the next is sent.
    let own = ListParams::default().labels(&log_selector_of(ORG));
    let own_segments = || async {
        let names: BTreeSet<String> = configmaps
            .list(&own)
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|cm| cm.metadata.name)
            .collect();
        names
    };
    let before = own_segments().await;
    let lowest = (1..=1024)
        .map(|seq| journal_segment_name(ORG, seq))
        .find(|name| before.contains(name))
        .unwrap_or_else(|| panic!("the log has no segment of its own: {before:?}"));
    assert!(!squatted.contains(&lowest), "the log wrote {lowest}, a squatted name");
    let mut n = 4;
    support::wait_for(&format!("the log's own lowest segment {lowest} deleted"), WAIT, || {
        n += 1;
        let (op, receiver, configmaps, lowest) = (&op, &receiver, &configmaps, &lowest);
        async move {
            let (status, body) = op.ingest(ORG, "last.one", json!({ "n": n })).await;
            assert_eq!(status, 202, "{body}");
            support::wait_for("the last event", WAIT, || async {
                receiver
                    .received()
                    .iter()
                    .any(|r| r.json()["data"]["n"] == n)
                    .then_some(())
            })
            .await;
            configmaps.get_opt(lowest).await.unwrap().is_none().then_some(())
        }
    })
    .await;
    assert!(!own_segments().await.is_empty(), "the log keeps a segment of its own");
    for name in &squatted {
        let still = configmaps
            .get_opt(name)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{name} was deleted"));
        assert_eq!(
            still.data.unwrap_or_default().get("mine").map(String::as_str),
            Some("not yours"),
            "{name} was written into"
        );
        assert!(
            still.metadata.labels.unwrap_or_default().is_empty(),
            "{name} was labelled"
        );
    }
    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}

/// Label selector of the segments of `org`'s delivery log.
fn log_selector_of(org: &str) -> String {
    capy_webhooks::delivery_log::segment_labels(org)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// How many times the operator found a second writer of a log (and read a shard back).
fn second_writers(op: &Operator) -> u64 {
    let text = op.metrics.encode();
    text.lines()
        .find_map(|l| l.strip_prefix("capy_webhooks_log_second_writers_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no second-writer counter in\n{text}"))
}

/// Waits until `receiver` got `n` deliveries, then checks that no delivery came twice.
async fn wait_each_once(receiver: &Receiver, n: usize, what: &str) {
    support::wait_for(what, WAIT, || async { (receiver.received().len() >= n).then_some(()) }).await;
    let received = receiver.received();
    let ids: std::collections::BTreeSet<String> = received.iter().map(|r| r.header("webhook-id").to_string()).collect();
    assert_eq!(ids.len(), received.len(), "{what}: a delivery arrived twice");
    assert_eq!(ids.len(), n, "{what}: more deliveries than events");
}

/// ConfigMaps carrying the delivery-log labels but no MAC, named as segments of a tenant's log
/// (at the last sequence number a name can carry, and at the next ones), are made by anyone who
/// may create ConfigMaps in the namespace. They never move the log's numbering (no overflow, no
/// wrap-around), never pass for a second writer (which would read back every log of the shard,
/// 1/16 of all organizations, on every write), and so the squatter's organization and another one
/// in its shard keep delivering every event, before and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_squats_on_segment_names_never_stall_a_shard() {
    use capy_webhooks::delivery_log::{journal_segment_name, segment_labels};
    use capy_webhooks::shards::shard_of;
    use k8s_openapi::api::core::v1::ConfigMap;

    const SQUATTER: &str = "org_squatter";
    let neighbour = (0..)
        .map(|i| format!("org_neighbour_{i}"))
        .find(|org| shard_of(org) == shard_of(SQUATTER))
        .unwrap();
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, "labelled-squat").await;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let squatted: Vec<String> = [u64::MAX, 1, 2]
        .into_iter()
        .map(|seq| journal_segment_name(SQUATTER, seq))
        .collect();
    for name in &squatted {
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                labels: Some(segment_labels(SQUATTER)),
                ..Default::default()
            },
            data: Some([("mine".to_string(), "not yours".to_string())].into()),
            ..Default::default()
        };
        configmaps.create(&PostParams::default(), &cm).await.unwrap();
    }
    let mut op = Operator::start(&client, &ns, Options::dispatching()).await;
    let (_, squatter_key) = op.mint_key(&client, &ns, SQUATTER, None).await;
    let (_, neighbour_key) = op.mint_key(&client, &ns, &neighbour, None).await;
    let (to_squatter, to_neighbour) = (Receiver::start(vec![]).await, Receiver::start(vec![]).await);
    op.create_endpoint(SQUATTER, &squatter_key, &to_squatter.url("/in"))
        .await;
    op.create_endpoint(&neighbour, &neighbour_key, &to_neighbour.url("/in"))
        .await;

    const EVENTS: usize = 5;
    for round in 1..=2 {
        for n in 0..EVENTS {
            for org in [SQUATTER, neighbour.as_str()] {
                let (status, body) = op.ingest(org, "squat.probe", json!({"round": round, "n": n})).await;
                assert_eq!(status, 202, "round {round}, {org}: {body}");
            }
        }
        wait_each_once(&to_squatter, round * EVENTS, "every event of the squatter").await;
        wait_each_once(&to_neighbour, round * EVENTS, "every event of its neighbour").await;
        assert_eq!(second_writers(&op), 0, "a squat passed for a second writer");
        if round == 1 {
            op.stop().await;
            op = Operator::start(&client, &ns, Options::dispatching()).await;
        }
    }
    for name in &squatted {
        let still = configmaps.get(name).await.unwrap();
        assert_eq!(
            still.data.unwrap_or_default().get("mine").map(String::as_str),
            Some("not yours"),
            "{name} was written into"
        );
    }
    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}

/// Events of a brand-new organization arriving all at once start one log writer, not one per
/// racing request: two writers would both claim the log's first segment name, and the one that
/// lost would pass for a second writer, answer 503 for events it had made durable, and have the
/// shard read back, sending deliveries twice. Every event is answered 202 and each delivery
/// arrives once. Repeated over fresh organizations, on a runtime with several threads: the race
/// is a few microseconds wide, and with the lookup and the start as two steps this test failed in
/// every run (a 503 "the delivery log cannot be written" by round 12 or so).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_into_a_new_organization_starts_one_writer() {
    const ENDPOINTS: usize = 10;
    const EVENTS: usize = 64;
    const ROUNDS: usize = 40;
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, "burst").await;
    let op = Operator::start(&client, &ns, Options::dispatching()).await;
    for round in 0..ROUNDS {
        let org = format!("org_burst_{round}");
        let (_, key) = op.mint_key(&client, &ns, &org, None).await;
        let receiver = Receiver::start(vec![]).await;
        for endpoint in 0..ENDPOINTS {
            op.create_endpoint(&org, &key, &receiver.url(&format!("/ep{endpoint}")))
                .await;
        }
        support::wait_for("every endpoint known to the operator", WAIT, || async {
            let (_, body, _) = op.call("GET", &op.url(&org, ""), Some(&key), None).await;
            (body["webhook_endpoints"].as_array()?.len() == ENDPOINTS).then_some(())
        })
        .await;
        let burst = (0..EVENTS).map(|n| {
            let (op, org) = (&op, org.clone());
            async move { op.ingest(&org, "burst.probe", json!({"n": n})).await }
        });
        for (status, body) in futures::future::join_all(burst).await {
            assert_eq!(status, 202, "round {round}: {body}");
            assert_eq!(body["deliveries"], ENDPOINTS, "round {round}: {body}");
        }
        wait_each_once(&receiver, EVENTS * ENDPOINTS, "every delivery of the burst").await;
        assert_eq!(second_writers(&op), 0, "round {round}: a second writer of the log");
    }
    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}

/// A delivery to a refused address fails with an error that names the class of address, never
/// the address, so `last_error` cannot be used to map the cluster's network.
#[tokio::test]
async fn a_refused_target_names_its_class_never_its_address() {
    const ORG: &str = "org_mapper";
    let (client, ns, op) = support::operator::in_new_namespace(
        "refusal",
        Options {
            dispatcher: true,
            allow_private_targets: false,
            ..Options::default()
        },
    )
    .await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    for (url, class) in [
        ("http://127.0.0.1:9/probe", "loopback address"),
        ("http://10.96.0.1/probe", "private address"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata address"),
        ("http://localhost:9/probe", "loopback address"),
    ] {
        let (status, created, _) = op
            .call("POST", &op.url(ORG, ""), Some(&key), Some(json!({"url": url})))
            .await;
        assert_eq!(status, 201, "{created}");
        let id = created["webhook_endpoint"]["id"].as_str().unwrap().to_string();
        let (status, _, _) = op
            .call("POST", &op.url(ORG, &format!("/{id}/test")), Some(&key), None)
            .await;
        assert_eq!(status, 202);
        let failed = support::wait_for(&format!("{url} refused"), WAIT, || async {
            let (_, body, _) = op
                .call("GET", &op.url(ORG, &format!("/{id}/deliveries")), Some(&key), None)
                .await;
            body["deliveries"]
                .as_array()?
                .iter()
                .find(|d| d["state"] == "failed")
                .cloned()
        })
        .await;
        let error = failed["last_error"].as_str().unwrap();
        assert!(error.contains(class), "{url}: {error}");
        for address in ["127.0.0.1", "10.96.0.1", "169.254.169.254", "::1"] {
            assert!(!error.contains(address), "{url}: the error names an address: {error}");
        }
    }
    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}
