//! Tenancy through Kubernetes objects: no path from one organization to another, however the
//! objects were made. Real API server, real operator components, real receivers on loopback.

mod support;

use std::time::Duration;

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
        },
    )
}

fn ready_reason(ep: &WebhookEndpoint) -> Option<(String, String)> {
    let status = ep.status.as_ref()?;
    (status.observed_generation == ep.metadata.generation).then_some(())?;
    let ready = status.conditions.iter().find(|c| c.type_ == CONDITION_READY)?;
    Some((ready.status.clone(), ready.reason.clone()))
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

/// A ConfigMap that carries the delivery log's labels but that the operator did not write: its
/// pending record is never delivered nor listed, before or after a restart, and its owner is told.
#[tokio::test]
async fn a_forged_log_segment_is_never_delivered_or_listed() {
    use capy_webhooks::delivery_log::{
        DeliveryRecord, DeliveryState, journal_segment_name, legacy_segment_name, pack_entries,
    };
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
    let now = jiff::Timestamp::now();
    let record = DeliveryRecord {
        id: "msg_forged000000000000000001".into(),
        endpoint_id: id.clone(),
        organization_id: ORG.into(),
        event_id: "evt_forged000000000000000001".into(),
        event_type: "forged.event".into(),
        state: DeliveryState::Pending,
        attempts: 0,
        max_attempts: 3,
        created_at: now,
        updated_at: now,
        next_attempt_at: Some(now),
        delivered_at: None,
        response_status: None,
        last_error: None,
    };
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
    let op = Operator::start(
        &client,
        &ns,
        Options {
            dispatcher: true,
            ..Options::default()
        },
    )
    .await;
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
    // Superseded segments are deleted on the writes after a delivery finishes: give them time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, _) = op.ingest(ORG, "last.one", json!({"n": 5})).await;
    assert_eq!(status, 202);
    support::wait_for("the last event", WAIT, || async {
        receiver
            .received()
            .iter()
            .any(|r| r.json()["type"] == "last.one")
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
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
