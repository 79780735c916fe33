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
