//! The dispatcher end to end: real API server, real operator components, real receivers on
//! loopback, signatures checked by an independent Standard Webhooks implementation.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capy_webhooks::resources::WebhookEndpoint;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::ListParams;
use kube::{Api, Client};
use serde_json::{Value, json};
use support::assert_conforms;
use support::operator::{Operator, Options};
use support::receiver::{Answer, Receiver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ORG: &str = "org_deliver";
const WAIT: Duration = Duration::from_secs(30);

struct Setup {
    client: Client,
    ns: String,
    op: Operator,
    key: String,
}

async fn setup(prefix: &str, opts: Options) -> Setup {
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, prefix).await;
    let op = Operator::start(
        &client,
        &ns,
        Options {
            dispatcher: true,
            ..opts
        },
    )
    .await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    Setup { client, ns, op, key }
}

impl Setup {
    /// Creates an endpoint over REST; returns its id and plaintext secret.
    async fn endpoint(&self, url: &str, event_types: &[&str]) -> (String, String) {
        let body = json!({"url": url, "event_types": event_types});
        let (status, created, _) = self
            .op
            .call("POST", &self.op.url(ORG, ""), Some(&self.key), Some(body))
            .await;
        assert_eq!(status, 201, "{created}");
        (
            created["webhook_endpoint"]["id"].as_str().unwrap().to_string(),
            created["plaintext_secret"].as_str().unwrap().to_string(),
        )
    }

    async fn deliveries(&self, id: &str) -> Vec<Value> {
        let (status, body, _) = self
            .op
            .call(
                "GET",
                &self.op.url(ORG, &format!("/{id}/deliveries?limit=1000")),
                Some(&self.key),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_conforms("DeliveryList", &body);
        body["deliveries"].as_array().unwrap().clone()
    }

    /// Waits until the endpoint's newest delivery satisfies `check`.
    async fn wait_delivery(&self, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        support::wait_for(what, WAIT, || async {
            self.deliveries(id).await.into_iter().next().filter(|d| check(d))
        })
        .await
    }
}

fn verify(secret: &str, received: &support::receiver::Received) -> Result<(), String> {
    let wh = standardwebhooks::Webhook::new(secret).map_err(|e| e.to_string())?;
    wh.verify(&received.body, &received.headers).map_err(|e| e.to_string())
}

async fn wait_received(receiver: &Receiver, n: usize) -> Vec<support::receiver::Received> {
    support::wait_for(&format!("{n} requests at the receiver"), WAIT, || async {
        let got = receiver.received();
        (got.len() >= n).then_some(got)
    })
    .await
}

/// Sends events until one arrives signed twice: the dispatcher's key cache follows the Secret
/// through a watch, so the first ones after a rotation may still carry one signature.
async fn wait_co_signed(s: &Setup, receiver: &Receiver) -> support::receiver::Received {
    support::wait_for("a delivery signed with both keys", WAIT, || async {
        s.op.ingest(ORG, "a.b", json!({})).await;
        let got = wait_received(receiver, 1).await;
        got.into_iter()
            .last()
            .filter(|r| r.header("webhook-signature").split(' ').count() == 2)
    })
    .await
}

#[tokio::test]
async fn a_signed_delivery_verifies_and_shows_in_the_deliveries_route() {
    let s = setup("signed", Options::default()).await;
    let receiver = Receiver::start(vec![]).await;
    let (id, secret) = s.endpoint(&receiver.url("/hooks"), &["database.*"]).await;

    let (status, accepted) = s.op.ingest(ORG, "database.created", json!({"name": "orders"})).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["deliveries"], 1);
    let event_id = accepted["id"].as_str().unwrap();
    // Not subscribed: no delivery.
    let (status, skipped) = s.op.ingest(ORG, "user.created", json!({})).await;
    assert_eq!((status.as_u16(), skipped["deliveries"].as_u64()), (202, Some(0)));

    let got = wait_received(&receiver, 1).await;
    let request = &got[0];
    verify(&secret, request).expect("the standardwebhooks crate verifies the signature");
    assert!(request.header("user-agent").starts_with("capy-webhooks/"));
    assert_eq!(request.header("content-type"), "application/json");
    let envelope = request.json();
    assert_eq!(envelope["type"], "database.created");
    assert_eq!(envelope["data"], json!({"name": "orders"}));
    assert!(envelope["timestamp"].as_str().unwrap().ends_with('Z'));

    let delivery = s
        .wait_delivery(&id, "delivery succeeded", |d| d["state"] == "succeeded")
        .await;
    assert_eq!(delivery["id"], request.header("webhook-id"));
    assert_eq!(delivery["attempts"], 1);
    assert_eq!(delivery["response_status"], 200);
    assert_eq!(delivery["event_type"], "database.created");
    assert_eq!(delivery["endpoint_id"], id.as_str());
    assert_eq!(delivery["organization_id"], ORG);
    assert_eq!(delivery["payload"], envelope);
    assert!(delivery["delivered_at"].is_string());
    assert!(delivery["next_attempt_at"].is_null());
    assert!(!event_id.is_empty());
    // Only the receiver's verification matters to customers; an altered body must fail it.
    let mut tampered = request.clone();
    tampered.body = bytes::Bytes::from_static(b"{\"type\":\"other\"}");
    assert!(verify(&secret, &tampered).is_err());
}

#[tokio::test]
async fn a_failure_then_success_gives_two_attempts() {
    let s = setup("retry", Options::default()).await;
    let receiver = Receiver::start(vec![Answer::Status(500)]).await;
    let (id, _) = s.endpoint(&receiver.url("/"), &[]).await;
    s.op.ingest(ORG, "a.b", json!({})).await;
    let delivery = s
        .wait_delivery(&id, "succeeded after a retry", |d| d["state"] == "succeeded")
        .await;
    assert_eq!(delivery["attempts"], 2);
    let got = receiver.received();
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[0].header("webhook-id"),
        got[1].header("webhook-id"),
        "webhook-id is stable across retries"
    );
}

#[tokio::test]
async fn exhausted_attempts_give_failed_and_the_recovery_routes_resend() {
    let s = setup("exhaust", Options::default()).await;
    let receiver = Receiver::start(vec![Answer::Status(500), Answer::Status(502), Answer::Status(500)]).await;
    let (id, _) = s.endpoint(&receiver.url("/"), &[]).await;
    s.op.ingest(ORG, "a.b", json!({"n": 1})).await;
    let failed = s
        .wait_delivery(&id, "failed after 3 attempts", |d| d["state"] == "failed")
        .await;
    assert_eq!(failed["attempts"], 3);
    assert_eq!(failed["max_attempts"], 3);
    assert_eq!(failed["response_status"], 500);
    assert!(failed["last_error"].as_str().unwrap().contains("HTTP 500"), "{failed}");
    assert!(failed["next_attempt_at"].is_null());
    assert!(failed["delivered_at"].is_null());

    // Retry a finished delivery: one more attempt, now; the receiver answers 200 this time.
    let delivery_id = failed["id"].as_str().unwrap();
    let url = s.op.url(ORG, &format!("/{id}/deliveries/{delivery_id}/retry"));
    let (status, body, _) = s.op.call("POST", &url, Some(&s.key), None).await;
    assert_eq!(status, 202, "{body}");
    assert_conforms("DeliveryResponse", &body);
    assert_eq!(body["delivery"]["state"], "pending");
    let done = s
        .wait_delivery(&id, "retried delivery succeeded", |d| d["state"] == "succeeded")
        .await;
    assert_eq!(done["attempts"], 4);
    let (status, _, _) =
        s.op.call(
            "POST",
            &s.op.url(ORG, &format!("/{id}/deliveries/msg_nope/retry")),
            Some(&s.key),
            None,
        )
        .await;
    assert_eq!(status, 404);

    // The test route sends a webhook.test event whatever the endpoint subscribes to.
    let (status, body, _) =
        s.op.call("POST", &s.op.url(ORG, &format!("/{id}/test")), Some(&s.key), None)
            .await;
    assert_eq!(status, 202, "{body}");
    let got = wait_received(&receiver, 5).await;
    assert_eq!(got[4].json()["type"], "webhook.test");
}

/// An outage, then recovery in bulk: every failed delivery of the window is sent again, with its
/// `webhook-id`; deliveries outside the window and those that succeeded are left alone.
#[tokio::test]
async fn recover_resends_the_failed_deliveries_of_a_window() {
    let s = setup(
        "recover",
        Options {
            schedule: "0s",
            ..Options::default()
        },
    )
    .await;
    let receiver = Receiver::start(vec![Answer::Status(503); 3]).await;
    let (id, secret) = s.endpoint(&receiver.url("/"), &[]).await;
    for n in 0..3 {
        s.op.ingest(ORG, "outage.event", json!({"n": n})).await;
    }
    support::wait_for("three failed deliveries", WAIT, || async {
        let failed = s
            .deliveries(&id)
            .await
            .into_iter()
            .filter(|d| d["state"] == "failed")
            .count();
        (failed == 3).then_some(())
    })
    .await;
    let failed_ids: std::collections::BTreeSet<String> = receiver
        .received()
        .iter()
        .map(|r| r.header("webhook-id").to_string())
        .collect();
    let recover_url = s.op.url(ORG, &format!("/{id}/recover"));
    let recover = |body: Value| s.op.call("POST", &recover_url, Some(&s.key), Some(body));
    // Refusals first: a window too long, since after until, unknown fields, no since.
    let now = jiff::Timestamp::now();
    let ago = |secs: i64| (now - jiff::SignedDuration::from_secs(secs)).to_string();
    for bad in [
        json!({"since": ago(15 * 24 * 3600)}),
        json!({"since": ago(10), "until": ago(20)}),
        json!({"since": ago(60), "extra": 1}),
        json!({}),
    ] {
        let (status, body, _) = recover(bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    // A window before the outage recovers nothing.
    let (status, body, _) = recover(json!({"since": ago(3600), "until": ago(1800)})).await;
    assert_eq!((status.as_u16(), &body), (202, &json!({"recovered": 0})));
    // The outage's window: all three, now answered 200.
    let (status, body, _) = recover(json!({"since": ago(600)})).await;
    assert_eq!((status.as_u16(), &body), (202, &json!({"recovered": 3})), "{body}");
    support::wait_for("the recovered deliveries succeed", WAIT, || async {
        let deliveries = s.deliveries(&id).await;
        deliveries.iter().all(|d| d["state"] == "succeeded").then_some(())
    })
    .await;
    let resent: Vec<_> = receiver.received().into_iter().skip(3).collect();
    assert_eq!(resent.len(), 3);
    for delivery in &resent {
        assert!(
            failed_ids.contains(delivery.header("webhook-id")),
            "the webhook-id is kept"
        );
        verify(&secret, delivery).unwrap();
    }
    // Nothing failed is left: recovering again sends nothing.
    let (_, body, _) = recover(json!({"since": ago(600)})).await;
    assert_eq!(body, json!({"recovered": 0}));
}

#[tokio::test]
async fn retry_after_is_honoured_on_429() {
    let s = setup("retryafter", Options::default()).await;
    let receiver = Receiver::start(vec![Answer::RetryAfter(429, 2)]).await;
    let (id, _) = s.endpoint(&receiver.url("/"), &[]).await;
    s.op.ingest(ORG, "a.b", json!({})).await;
    s.wait_delivery(&id, "succeeded after Retry-After", |d| d["state"] == "succeeded")
        .await;
    let got = receiver.received();
    let gap = got[1].at.duration_since(got[0].at);
    // The schedule says 200 ms; the receiver asked for 2 s.
    assert!(gap >= Duration::from_millis(1900), "second attempt after {gap:?}");
}

#[tokio::test]
async fn a_timeout_is_a_failed_attempt() {
    let opts = Options {
        attempt_timeout: Duration::from_millis(300),
        ..Options::default()
    };
    let s = setup("timeout", opts).await;
    let receiver = Receiver::start(vec![Answer::Slow(Duration::from_secs(2)); 3]).await;
    let (id, _) = s.endpoint(&receiver.url("/"), &[]).await;
    s.op.ingest(ORG, "a.b", json!({})).await;
    let failed = s
        .wait_delivery(&id, "failed by timeouts", |d| d["state"] == "failed")
        .await;
    assert_eq!(failed["attempts"], 3);
    assert!(failed["last_error"].as_str().unwrap().contains("timed out"), "{failed}");
    assert!(failed["response_status"].is_null());
}

#[tokio::test]
async fn gone_disables_the_endpoint_with_a_reason_and_an_event() {
    let s = setup("gone", Options::default()).await;
    let receiver = Receiver::start(vec![Answer::Status(410)]).await;
    let (id, _) = s.endpoint(&receiver.url("/"), &[]).await;
    s.op.ingest(ORG, "a.b", json!({})).await;
    let failed = s.wait_delivery(&id, "failed by 410", |d| d["state"] == "failed").await;
    assert_eq!(failed["attempts"], 1);
    let api: Api<WebhookEndpoint> = Api::namespaced(s.client.clone(), &s.ns);
    let ep = support::wait_for("endpoint disabled", WAIT, || async {
        api.get(&id).await.ok().filter(|ep| {
            !ep.spec.active
                && ep
                    .status
                    .as_ref()
                    .and_then(|st| st.disabled_reason.as_deref())
                    .is_some_and(|r| r.contains("410"))
        })
    })
    .await;
    assert!(!ep.spec.active);
    let (_, listed, _) = s.op.call("GET", &s.op.url(ORG, ""), Some(&s.key), None).await;
    assert_eq!(listed["webhook_endpoints"][0]["is_active"], false);
    assert_eq!(listed["webhook_endpoints"][0]["health"], "disabled");
    let events: Api<K8sEvent> = Api::namespaced(s.client.clone(), &s.ns);
    support::wait_for("EndpointDisabled event", WAIT, || async {
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("EndpointDisabled") && e.type_.as_deref() == Some("Warning"))
    })
    .await;
    // An inactive endpoint gets no new deliveries.
    let (_, accepted) = s.op.ingest(ORG, "a.b", json!({})).await;
    assert_eq!(accepted["deliveries"], 0);
}

#[tokio::test]
async fn during_rotation_both_secrets_sign_and_each_verifies() {
    let s = setup("rotation", Options::default()).await;
    let receiver = Receiver::start(vec![]).await;
    let (id, old_secret) = s.endpoint(&receiver.url("/"), &[]).await;
    let (status, rotated, _) =
        s.op.call(
            "POST",
            &s.op.url(ORG, &format!("/{id}/rotate-secret")),
            Some(&s.key),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let new_secret = rotated["plaintext_secret"].as_str().unwrap().to_string();
    let request = wait_co_signed(&s, &receiver).await;
    let signatures: Vec<String> = request
        .header("webhook-signature")
        .split(' ')
        .map(str::to_string)
        .collect();
    for (secret, signature) in [(&new_secret, &signatures[0]), (&old_secret, &signatures[1])] {
        let mut only_one = request.clone();
        only_one.headers.insert("webhook-signature", signature.parse().unwrap());
        verify(secret, &only_one).expect("each signature verifies with its own secret");
        let mut wrong = request.clone();
        wrong.headers.insert("webhook-signature", signature.parse().unwrap());
        let other = if secret == &new_secret {
            &old_secret
        } else {
            &new_secret
        };
        assert!(verify(other, &wrong).is_err());
    }
}

#[tokio::test]
async fn ed25519_signatures_verify_with_pynacl_and_a_change_of_scheme_co_signs() {
    let s = setup("ed25519", Options::default()).await;
    let receiver = Receiver::start(vec![]).await;
    let body = json!({"url": receiver.url("/"), "signature_scheme": "ed25519"});
    let (status, created, _) = s.op.call("POST", &s.op.url(ORG, ""), Some(&s.key), Some(body)).await;
    assert_eq!(status, 201, "{created}");
    assert_conforms("EndpointWithSecret", &created);
    assert_eq!(created["webhook_endpoint"]["signature_scheme"], "ed25519");
    let id = created["webhook_endpoint"]["id"].as_str().unwrap().to_string();
    let public_key = created["plaintext_secret"].as_str().unwrap().to_string();
    assert!(public_key.starts_with("whpk_"), "{public_key}");

    // The Secret holds the private key; neither key is in the list answer.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let stored = secrets.get(&format!("{id}-signing")).await.unwrap();
    let private = String::from_utf8(stored.data.unwrap()["signing-secret"].0.clone()).unwrap();
    assert!(private.starts_with("whsk_"));
    let (status, list, _) = s.op.call("GET", &s.op.url(ORG, ""), Some(&s.key), None).await;
    assert_eq!(status, 200);
    assert_conforms("EndpointList", &list);
    assert_eq!(list["webhook_endpoints"][0]["signature_scheme"], "ed25519");
    let listed = list.to_string();
    assert!(!listed.contains(&public_key[5..]) && !listed.contains(&private[5..]));

    s.op.ingest(ORG, "database.created", json!({"name": "orders"})).await;
    let request = wait_received(&receiver, 1).await.remove(0);
    let header = request.header("webhook-signature").to_string();
    assert!(header.starts_with("v1a,") && !header.contains(' '), "{header}");
    support::verify_v1a(&public_key, &request).expect("PyNaCl verifies the v1a signature");
    // The verifier really checks: another body, or another key, fails.
    let mut tampered = request.clone();
    tampered.body = bytes::Bytes::from_static(b"{\"type\":\"other\"}");
    assert!(support::verify_v1a(&public_key, &tampered).is_err());
    let other_key = format!("whpk_{}", "A".repeat(43) + "=");
    assert!(support::verify_v1a(&other_key, &request).is_err());

    // Back to HMAC: the update answers with the new whsec_ secret, and during the grace period
    // both keys sign, each verifying with its own implementation.
    let (status, updated, _) =
        s.op.call(
            "PATCH",
            &s.op.url(ORG, &format!("/{id}")),
            Some(&s.key),
            Some(json!({"signature_scheme": "hmac-sha256"})),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_conforms("EndpointResponse", &updated);
    assert!(
        updated["webhook_endpoint"].get("signature_scheme").is_none(),
        "{updated}"
    );
    let secret = updated["plaintext_secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"), "{secret}");
    let request = wait_co_signed(&s, &receiver).await;
    let header = request.header("webhook-signature").to_string();
    let (v1, v1a) = header.split_once(' ').unwrap();
    assert!(v1.starts_with("v1,") && v1a.starts_with("v1a,"), "{header}");
    verify(&secret, &request).expect("the standardwebhooks crate verifies the new v1 signature");
    support::verify_v1a(&public_key, &request).expect("PyNaCl verifies the old key's v1a signature");
    let mut only_v1 = request.clone();
    only_v1.headers.insert("webhook-signature", v1.parse().unwrap());
    assert!(support::verify_v1a(&public_key, &only_v1).is_err());
}

#[tokio::test]
async fn an_inactive_endpoint_holds_its_deliveries_until_reactivated() {
    let opts = Options {
        schedule: "0s,2s,2s",
        ..Options::default()
    };
    let s = setup("inactive", opts).await;
    let receiver = Receiver::start(vec![Answer::Status(500)]).await;
    let (id, _) = s.endpoint(&receiver.url("/"), &[]).await;
    // A witness on the same schedule that stays active: its attempts show the schedule ran.
    let witness = Receiver::start(vec![Answer::Status(500); 3]).await;
    s.endpoint(&witness.url("/"), &[]).await;
    s.op.ingest(ORG, "a.b", json!({})).await;
    wait_received(&receiver, 1).await;
    let (status, _, _) =
        s.op.call(
            "PATCH",
            &s.op.url(ORG, &format!("/{id}")),
            Some(&s.key),
            Some(json!({"is_active": false})),
        )
        .await;
    assert_eq!(status, 200);
    // The retry was due 2 s (±20 %) after the first attempt. The witness's third attempt comes
    // at least 3.2 s after its first: by then the inactive endpoint's retry was long due.
    wait_received(&witness, 3).await;
    assert_eq!(receiver.received().len(), 1, "no attempt while inactive");
    let pending = s.deliveries(&id).await;
    assert_eq!(pending[0]["state"], "pending");
    s.op.call(
        "PATCH",
        &s.op.url(ORG, &format!("/{id}")),
        Some(&s.key),
        Some(json!({"is_active": true})),
    )
    .await;
    let done = s
        .wait_delivery(&id, "delivered after re-activation", |d| d["state"] == "succeeded")
        .await;
    assert_eq!(done["attempts"], 2);
}

#[tokio::test]
async fn health_and_delivery_summary_reach_the_status() {
    let s = setup("health", Options::default()).await;
    let receiver = Receiver::start(vec![]).await;
    let (id, _) = s.endpoint(&receiver.url("/"), &[]).await;
    for n in 0..5 {
        s.op.ingest(ORG, "a.b", json!({"n": n})).await;
    }
    let api: Api<WebhookEndpoint> = Api::namespaced(s.client.clone(), &s.ns);
    let ep = support::wait_for("status summary", WAIT, || async {
        api.get(&id).await.ok().filter(|ep| {
            ep.status
                .as_ref()
                .and_then(|st| st.deliveries.as_ref())
                .is_some_and(|d| d.succeeded == 5)
        })
    })
    .await;
    let status = ep.status.unwrap();
    assert_eq!(status.health, Some(capy_webhooks::resources::Health::Healthy));
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Healthy" && c.status == "True")
    );
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "controller's conditions kept"
    );
    let (_, listed, _) = s.op.call("GET", &s.op.url(ORG, ""), Some(&s.key), None).await;
    assert_eq!(listed["webhook_endpoints"][0]["health"], "healthy");
    assert_eq!(s.deliveries(&id).await.len(), 5);
}

#[tokio::test]
async fn ingest_refuses_bad_requests() {
    let s = setup("ingest", Options::default()).await;
    let url = format!("{}/v1/organizations/{ORG}/events", s.op.ingest_base);
    let send = |req: reqwest::RequestBuilder| async move {
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap();
        assert!(body["error"].is_string(), "{body}");
        status
    };
    let token = support::operator::INGEST_TOKEN;
    assert_eq!(
        send(s.op.http.post(&url).json(&json!({"type": "a.b", "data": {}}))).await,
        401
    );
    assert_eq!(
        send(
            s.op.http
                .post(&url)
                .bearer_auth("wrong-token-0123456789")
                .json(&json!({"type": "a.b", "data": {}}))
        )
        .await,
        401
    );
    assert_eq!(
        send(
            s.op.http
                .post(&url)
                .bearer_auth(token)
                .json(&json!({"type": "a.*", "data": {}}))
        )
        .await,
        400
    );
    assert_eq!(
        send(
            s.op.http
                .post(&url)
                .bearer_auth(token)
                .json(&json!({"type": "a.b", "data": {}, "x": 1}))
        )
        .await,
        400
    );
    let huge = json!({"type": "a.b", "data": {"blob": "x".repeat(70 * 1024)}});
    assert_eq!(send(s.op.http.post(&url).bearer_auth(token).json(&huge)).await, 413);
    assert_eq!(send(s.op.http.post(&url).bearer_auth(token).body("{}")).await, 415);

    // Idempotency-Key: the same key answers with the first result and delivers once.
    let receiver = Receiver::start(vec![]).await;
    let (idempotent_ep, _) = s.endpoint(&receiver.url("/"), &[]).await;
    let post = || {
        s.op.http
            .post(&url)
            .bearer_auth(token)
            .header("idempotency-key", "order-42")
            .json(&json!({"type": "a.b", "data": {}}))
            .send()
    };
    let first: Value = post().await.unwrap().json().await.unwrap();
    let second: Value = post().await.unwrap().json().await.unwrap();
    assert_eq!(first, second);
    wait_received(&receiver, 1).await;
    let (_, again) = s.op.ingest(ORG, "a.c", json!({})).await;
    wait_received(&receiver, 2).await;
    assert_ne!(again["id"], first["id"]);
    assert_eq!(receiver.received().len(), 2, "the duplicate was not delivered");

    // 50 requests with one new key at once: one event, the same answer to every one of them.
    let answers = futures::future::join_all((0..50).map(|_| async {
        let res =
            s.op.http
                .post(&url)
                .bearer_auth(token)
                .header("idempotency-key", "order-43")
                .json(&json!({"type": "a.b", "data": {"concurrent": true}}))
                .send()
                .await
                .unwrap();
        assert_eq!(res.status(), 202);
        res.json::<Value>().await.unwrap()
    }))
    .await;
    assert!(answers.iter().all(|a| a == &answers[0]), "one answer for every request");
    // Deliveries exist once their event is accepted: after every answer, the list is complete.
    let concurrent = s
        .deliveries(&idempotent_ep)
        .await
        .iter()
        .filter(|d| d["payload"]["data"]["concurrent"] == true)
        .count();
    assert_eq!(concurrent, 1, "one delivery for 50 concurrent requests with one key");

    // Keys are at most 255 characters.
    let long_key = "k".repeat(256);
    let res =
        s.op.http
            .post(&url)
            .bearer_auth(token)
            .header("idempotency-key", long_key)
            .json(&json!({"type": "a.b", "data": {}}))
            .send()
            .await
            .unwrap();
    assert_eq!(res.status(), 400);
    assert!(res.text().await.unwrap().contains("Idempotency-Key"));
}

#[tokio::test]
async fn settings_add_headers_and_pace_one_endpoint_without_holding_back_others() {
    let s = setup("settings", Options::default()).await;
    let paced = Receiver::start(vec![]).await;
    let free = Receiver::start(vec![]).await;
    let (paced_id, paced_secret) = s.endpoint(&paced.url("/paced"), &["pace.*"]).await;
    let (free_id, _) = s.endpoint(&free.url("/free"), &["pace.*"]).await;
    let settings_url = s.op.url(ORG, &format!("/{paced_id}/settings"));
    let patch = |body: Value| s.op.call("PATCH", &settings_url, Some(&s.key), Some(body));

    // Defaults, in the documented shape.
    let (status, body, _) = s.op.call("GET", &settings_url, Some(&s.key), None).await;
    assert_eq!(
        (status.as_u16(), &body),
        (200, &json!({"headers": {}, "rate_limit": null, "max_attempts": null}))
    );
    assert_conforms("Settings", &body);

    // Refusals name the problem, never echo a value, and change nothing.
    let many: serde_json::Map<String, Value> = (0..17).map(|i| (format!("x-h{i}"), json!("v"))).collect();
    for (bad, want) in [
        (json!({"headers": {"Host": "evil.example"}}), "Host"),
        (
            json!({"headers": {"webhook-signature": "v1,forged-signature"}}),
            "webhook-signature",
        ),
        (json!({"headers": {"Content-Type": "text/plain"}}), "Content-Type"),
        (json!({"headers": {"Bad Name": "v"}}), "Bad Name"),
        (
            json!({"headers": {"X-Split": "a\r\nInjected: forged-signature"}}),
            "X-Split",
        ),
        (json!({"headers": {"X-Long": "v".repeat(1025)}}), "1024"),
        (json!({"headers": many}), "16"),
        (json!({"rate_limit": 0}), "rate_limit"),
        (json!({"max_attempts": 51}), "max_attempts"),
        (json!({"rate_limit": "fast"}), "rate_limit"),
        (json!({"ratelimit": 3}), "ratelimit"),
    ] {
        let (status, body, _) = patch(bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {body}");
        let message = body.to_string();
        assert!(message.contains(want), "{bad}: {message}");
        assert!(
            !message.contains("forged-signature") && !message.contains("evil.example"),
            "{message}"
        );
    }
    // Another organization's endpoint is not found.
    let (_, other_key) = s.op.mint_key(&s.client, &s.ns, "org_other", None).await;
    let foreign = s.op.url("org_other", &format!("/{paced_id}/settings"));
    let (status, _, _) = s.op.call("GET", &foreign, Some(&other_key), None).await;
    assert_eq!(status, 404);

    let (status, body, _) =
        patch(json!({"headers": {"X-Tenant": "t-42", "Authorization": "Bearer abc"}, "rate_limit": 2})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"headers": {"Authorization": "Bearer abc", "X-Tenant": "t-42"}, "rate_limit": 2, "max_attempts": null})
    );
    // kubectl users see and set the same fields in the spec; the CRD refuses what REST refuses.
    let api: Api<WebhookEndpoint> = Api::namespaced(s.client.clone(), &s.ns);
    let cr = api.get(&paced_id).await.unwrap();
    assert_eq!((cr.spec.rate_limit, cr.spec.headers.len()), (Some(2), 2));
    for bad in [
        json!({"spec": {"headers": {"Webhook-Id": "x"}}}),
        json!({"spec": {"headers": {"bad name": "x"}}}),
        json!({"spec": {"headers": {"X-A": "a\nb"}}}),
        json!({"spec": {"rateLimit": 0}}),
    ] {
        let err = api
            .patch(
                &paced_id,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&bad),
            )
            .await
            .expect_err("the CRD refuses it");
        assert!(
            err.to_string().contains("422") || err.to_string().contains("Invalid"),
            "{bad}: {err}"
        );
    }
    // A null clears; an absent field is kept.
    let (_, body, _) = patch(json!({"max_attempts": 5})).await;
    assert_eq!(
        (body["rate_limit"].as_u64(), body["max_attempts"].as_u64()),
        (Some(2), Some(5))
    );
    let (_, body, _) = patch(json!({"max_attempts": null})).await;
    assert!(body["max_attempts"].is_null() && body["rate_limit"] == 2, "{body}");

    // Eight events to both endpoints: the paced one gets them at most 2 per second, the other
    // at once.
    const EVENTS: usize = 8;
    for n in 0..EVENTS {
        let (status, accepted) = s.op.ingest(ORG, "pace.tick", json!({"n": n})).await;
        assert_eq!((status.as_u16(), accepted["deliveries"].as_u64()), (202, Some(2)));
    }
    let free_got = wait_received(&free, EVENTS).await;
    let paced_got = wait_received(&paced, EVENTS).await;
    assert_eq!(
        (free_got.len(), paced_got.len()),
        (EVENTS, EVENTS),
        "none dropped, none twice"
    );
    let arrivals: Vec<std::time::Instant> = paced_got.iter().map(|r| r.at).collect();
    let gaps: Vec<u128> = arrivals.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
    let mut per_second = std::collections::BTreeMap::<u64, usize>::new();
    for at in &arrivals {
        *per_second.entry((*at - arrivals[0]).as_secs()).or_default() += 1;
    }
    println!("paced arrivals: gaps {gaps:?} ms, per second {per_second:?}");
    // 500 ms apart, less the jitter of loopback delivery; no three within one second (100 ms of
    // jitter allowed), and the eight take at least 3.5 s less that jitter.
    assert!(gaps.iter().all(|g| *g >= 300), "gaps {gaps:?}");
    assert!(
        arrivals.windows(3).all(|w| (w[2] - w[0]).as_millis() >= 900),
        "three arrivals within one second: gaps {gaps:?}"
    );
    assert!(
        (arrivals[EVENTS - 1] - arrivals[0]).as_millis() >= 3_400,
        "gaps {gaps:?}"
    );
    // The unpaced endpoint was not held back: all of its deliveries came before the paced
    // endpoint's third.
    let free_last = free_got.iter().map(|r| r.at).max().unwrap();
    assert!(free_last < arrivals[2], "the other endpoint waited for the paced one");
    // The custom headers reach the paced endpoint only, and the signature still verifies.
    for request in &paced_got {
        assert_eq!(
            (request.header("x-tenant"), request.header("authorization")),
            ("t-42", "Bearer abc")
        );
        verify(&paced_secret, request).unwrap();
    }
    assert!(free_got.iter().all(|r| r.header("x-tenant").is_empty()));
    let _ = free_id;
}

/// A 503 means "not accepted": an event whose deliveries could not be made durable is taken back
/// out of the log, so a producer that retries it does not get it delivered twice. The API server
/// refuses every ConfigMap create for a while; the event sent meanwhile is answered 503 and never
/// delivered, neither once creates work again nor after later events.
#[tokio::test]
async fn an_event_answered_503_is_never_delivered() {
    let s = setup("refused", Options::default()).await;
    let receiver = Receiver::start(vec![]).await;
    let (id, _) = s.endpoint(&receiver.url("/hooks"), &[]).await;
    let op = &s.op;
    let send = |n: u32| async move { op.ingest(ORG, "probe.sent", json!({"n": n})).await };

    let (status, first) = send(1).await;
    assert_eq!(status, 202, "{first}");
    wait_received(&receiver, 1).await;

    support::block_configmap_creates(&s.client, &s.ns).await;
    let (status, refused) = send(2).await;
    assert_eq!(status, 503, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("cannot be written"),
        "{refused}"
    );
    support::unblock_configmap_creates(&s.client, &s.ns).await;

    let (status, third) = send(3).await;
    assert_eq!(status, 202, "{third}");
    let (status, fourth) = send(4).await;
    assert_eq!(status, 202, "{fourth}");
    // Positive signal: the later events are delivered and listed; had the refused one stayed in
    // the log, it would have been written and attempted no later than them.
    wait_received(&receiver, 3).await;
    let listed = s
        .wait_delivery(&id, "the newest delivery succeeded", |d| d["state"] == "succeeded")
        .await;
    assert_eq!(listed["payload"]["data"]["n"], 4);
    let sent: Vec<u64> = receiver
        .received()
        .iter()
        .map(|r| r.json()["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(sent, [1, 3, 4], "the event answered 503 was delivered");
    let mut listed: Vec<u64> = s
        .deliveries(&id)
        .await
        .iter()
        .map(|d| d["payload"]["data"]["n"].as_u64().unwrap())
        .collect();
    listed.sort();
    assert_eq!(listed, [1, 3, 4], "the event answered 503 is in the log");
}

/// Many endpoints on one host share the dispatcher's keep-alive connections: a second burst like
/// the first (half its size) reuses the connections the first opened instead of opening new ones (with an idle
/// pool smaller than the attempts in flight, each burst closed and reopened most of them, which
/// cost the operator about 40 % of its CPU at 100 endpoints in `make bench`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_on_one_host_reuse_connections_across_bursts() {
    const ENDPOINTS: usize = 40;
    const EVENTS: usize = 4;
    let s = setup("keepalive", Options::default()).await;
    // Slow answers keep many attempts in flight at once: up to 8 per endpoint.
    let receiver = Receiver::start(vec![Answer::Slow(Duration::from_millis(200)); 2 * ENDPOINTS * EVENTS]).await;
    for n in 0..ENDPOINTS {
        s.endpoint(&receiver.url(&format!("/ep{n}")), &[]).await;
    }
    support::wait_for("every endpoint known to the dispatcher", WAIT, || async {
        let (_, body, _) = s.op.call("GET", &s.op.url(ORG, ""), Some(&s.key), None).await;
        (body["webhook_endpoints"].as_array()?.len() == ENDPOINTS).then_some(())
    })
    .await;
    let burst = |round: usize, events: usize| {
        let op = &s.op;
        futures::future::join_all((0..events).map(move |n| async move {
            let (status, body) = op.ingest(ORG, "burst.sent", json!({"round": round, "n": n})).await;
            assert_eq!(status, 202, "{body}");
        }))
    };
    let connections = |from: usize| -> std::collections::HashSet<std::net::SocketAddr> {
        receiver.received()[from..].iter().filter_map(|r| r.remote).collect()
    };
    // Answered, not only received: each connection is back in the pool.
    let op = &s.op;
    let answered = |n: usize| async move {
        support::wait_for(&format!("{n} deliveries succeeded"), WAIT, || async {
            let text = op.metrics.encode();
            let done = text
                .lines()
                .find_map(|l| l.strip_prefix("capy_webhooks_deliveries_total{outcome=\"succeeded\"} "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            (done as usize >= n).then_some(())
        })
        .await
    };
    burst(1, EVENTS).await;
    answered(ENDPOINTS * EVENTS).await;
    let first = connections(0);
    // The second burst is half the first, so it never has more attempts in flight than the first
    // opened connections for; and a connection goes back to the pool a moment after its answer
    // was read, so the pool is given that moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    burst(2, EVENTS / 2).await;
    answered(ENDPOINTS * EVENTS + ENDPOINTS * EVENTS / 2).await;
    let fresh = connections(ENDPOINTS * EVENTS).difference(&first).count();
    assert!(
        first.len() >= ENDPOINTS * EVENTS / 2,
        "the first burst had many attempts in flight: {}",
        first.len()
    );
    // A few new connections happen on a loaded machine (measured up to 15 of 145); a pool smaller
    // than the attempts in flight opens most of the second burst's 80 anew.
    assert!(
        fresh <= first.len() / 4,
        "the second burst opened {fresh} new connections; the first opened {}",
        first.len()
    );
}

/// Certificates made at test time: one CA that issues the receiver's certificate (for
/// `127.0.0.1`) and the client certificates the receiver accepts.
struct TestPki {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A certificate and its key, PEM.
struct Issued {
    cert: String,
    key: String,
}

impl TestPki {
    fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "capy test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        Self { ca }
    }

    fn issue(&self, names: &[&str], common_name: &str, usage: rcgen::ExtendedKeyUsagePurpose) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &*self.ca).unwrap();
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A TLS receiver on loopback that requires a client certificate issued by the test CA: it
/// records the common name each accepted request came with, and counts refused handshakes.
struct MtlsReceiver {
    host: &'static str,
    port: u16,
    accepted: Arc<Mutex<Vec<(String, support::receiver::Received)>>>,
    refused: Arc<AtomicUsize>,
}

impl MtlsReceiver {
    async fn start(pki: &TestPki) -> Self {
        Self::start_for(pki, "127.0.0.1").await
    }

    /// A receiver whose certificate names only `host` (a name or an IP address), reached at
    /// `https://host:port/mtls`.
    async fn start_for(pki: &TestPki, host: &'static str) -> Self {
        use rustls::pki_types::PrivateKeyDer;
        use rustls::pki_types::pem::PemObject;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca.der().clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .unwrap();
        let server = pki.issue(&[host], "receiver", rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![rustls::pki_types::CertificateDer::from_pem_slice(server.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(server.key.as_bytes()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(AtomicUsize::new(0));
        let (seen, refusals) = (accepted.clone(), refused.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, remote)) = listener.accept().await else {
                    return;
                };
                let (acceptor, seen, refusals) = (acceptor.clone(), seen.clone(), refusals.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        refusals.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    let Some(request) = read_request(&mut tls, remote).await else {
                        // TLS 1.3: a missing certificate is refused after the client's Finished.
                        refusals.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    let peer = tls.get_ref().1.peer_certificates().and_then(|c| c.first().cloned());
                    let common_name = peer.map(|der| common_name_of(&der)).unwrap_or_default();
                    seen.lock().unwrap().push((common_name, request));
                    let _ = tls
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Self {
            host,
            port,
            accepted,
            refused,
        }
    }

    fn url(&self) -> String {
        format!("https://{}:{}/mtls", self.host, self.port)
    }

    fn accepted(&self) -> Vec<(String, support::receiver::Received)> {
        self.accepted.lock().unwrap().clone()
    }
}

/// Reads one HTTP/1.1 request (headers, then `content-length` bytes of body).
async fn read_request<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    remote: std::net::SocketAddr,
) -> Option<support::receiver::Received> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let path = lines.next()?.split(' ').nth(1)?.to_string();
    let mut headers = warp::http::HeaderMap::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        headers.append(
            warp::http::HeaderName::from_bytes(name.trim().as_bytes()).ok()?,
            value.trim().parse().ok()?,
        );
    }
    let length: usize = headers.get("content-length")?.to_str().ok()?.parse().ok()?;
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(support::receiver::Received {
        path,
        headers,
        body: bytes::Bytes::copy_from_slice(&buf[head_end..head_end + length]),
        at: std::time::Instant::now(),
        remote: Some(remote),
    })
}

/// The subject's common name of a DER certificate, found by its OID (2.5.4.3) and read as the
/// short string that follows: enough for the names this test issues.
fn common_name_of(der: &[u8]) -> String {
    const CN_OID: [u8; 5] = [0x06, 0x03, 0x55, 0x04, 0x03];
    // The last common name in the certificate is the subject's (the issuer's comes first).
    let Some(at) = der.windows(5).rposition(|w| w == CN_OID) else {
        return String::new();
    };
    let len = der[at + 6] as usize;
    String::from_utf8_lossy(&der[at + 7..at + 7 + len]).to_string()
}

async fn tls_secret(client: &Client, ns: &str, name: &str, type_: &str, cert: &str, key: &str) {
    use k8s_openapi::ByteString;
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        type_: Some(type_.into()),
        data: Some(
            [
                ("tls.crt".to_string(), ByteString(cert.as_bytes().to_vec())),
                ("tls.key".to_string(), ByteString(key.as_bytes().to_vec())),
            ]
            .into(),
        ),
        ..Default::default()
    };
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns)
        .create(&Default::default(), &secret)
        .await
        .unwrap();
}

/// Creates an endpoint over REST: its id, its `plaintext_secret` and the whole answer.
async fn create_endpoint(s: &Setup, body: Value) -> (String, String, Value) {
    let (status, created, _) = s.op.call("POST", &s.op.url(ORG, ""), Some(&s.key), Some(body)).await;
    assert_eq!(status, 201, "{created}");
    assert_conforms("EndpointWithSecret", &created);
    (
        created["webhook_endpoint"]["id"].as_str().unwrap().to_string(),
        created["plaintext_secret"].as_str().unwrap().to_string(),
        created,
    )
}

/// Waits until the endpoint's condition `type_` has `wanted` (status, reason); its message.
async fn condition(s: &Setup, id: &str, type_: &str, wanted: (&str, &str)) -> String {
    let endpoints: Api<WebhookEndpoint> = Api::namespaced(s.client.clone(), &s.ns);
    support::wait_for(&format!("{id} {type_}={wanted:?}"), Duration::from_secs(60), || async {
        let ep = endpoints.get(id).await.ok()?;
        let c = ep.status?.conditions.into_iter().find(|c| c.type_ == type_)?;
        (c.status == wanted.0 && c.reason == wanted.1).then_some(c.message)
    })
    .await
}

#[tokio::test]
async fn mutual_tls_presents_the_named_certificate_and_refuses_without_a_usable_one() {
    let pki = TestPki::new();
    let s = setup(
        "mtls",
        Options {
            receiver_roots_pem: pki.ca.pem().into_bytes(),
            ..Options::default()
        },
    )
    .await;
    let receiver = MtlsReceiver::start(&pki).await;
    let client_auth = rcgen::ExtendedKeyUsagePurpose::ClientAuth;
    let capy = pki.issue(&[], "capy-webhooks-client", client_auth.clone());
    tls_secret(
        &s.client,
        &s.ns,
        "client-tls",
        "kubernetes.io/tls",
        &capy.cert,
        &capy.key,
    )
    .await;
    let create = |certificate: Option<&str>| {
        let mut body = json!({"url": receiver.url()});
        if let Some(name) = certificate {
            body["client_certificate_secret"] = json!(name);
        }
        body
    };

    // With the certificate: delivered, the receiver saw it, and the signature verifies.
    let (with_cert, secret, created) = create_endpoint(&s, create(Some("client-tls"))).await;
    assert_eq!(created["webhook_endpoint"]["client_certificate_secret"], "client-tls");
    condition(
        &s,
        &with_cert,
        "ClientCertificateReady",
        ("True", "ClientCertificateAvailable"),
    )
    .await;
    s.op.ingest(ORG, "a.b", json!({"n": 1})).await;
    let (common_name, request) = support::wait_for("a delivery over mutual TLS", WAIT, || async {
        receiver.accepted().into_iter().next()
    })
    .await;
    assert_eq!(common_name, "capy-webhooks-client");
    assert_eq!(request.path, "/mtls");
    verify(&secret, &request).expect("the signature verifies");
    s.wait_delivery(&with_cert, "delivered over mutual TLS", |d| d["state"] == "succeeded")
        .await;

    // Without one, the receiver refuses the handshake: the attempt fails, nothing is accepted.
    s.op.call("DELETE", &s.op.url(ORG, &format!("/{with_cert}")), Some(&s.key), None)
        .await;
    let (without, _, _) = create_endpoint(&s, create(None)).await;
    s.op.ingest(ORG, "a.b", json!({"n": 2})).await;
    let failed = s
        .wait_delivery(&without, "an attempt refused by the receiver", |d| {
            d["attempts"].as_u64() >= Some(1)
        })
        .await;
    assert_ne!(failed["state"], "succeeded", "{failed}");
    assert!(receiver.refused.load(Ordering::SeqCst) >= 1);
    assert_eq!(receiver.accepted().len(), 1);
    s.op.call("DELETE", &s.op.url(ORG, &format!("/{without}")), Some(&s.key), None)
        .await;

    // A Secret that is missing, not of type kubernetes.io/tls, or whose key is not the
    // certificate's: the endpoint is not Ready, says why, and nothing is attempted.
    let other = pki.issue(&[], "other", client_auth);
    tls_secret(&s.client, &s.ns, "opaque-tls", "Opaque", &capy.cert, &capy.key).await;
    tls_secret(
        &s.client,
        &s.ns,
        "mismatched-tls",
        "kubernetes.io/tls",
        &capy.cert,
        &other.key,
    )
    .await;
    let mut refused = Vec::new();
    for (name, reason) in [
        ("later-tls", "ClientCertificateMissing"),
        ("opaque-tls", "ClientCertificateNotTLS"),
        ("mismatched-tls", "ClientCertificateMalformed"),
    ] {
        let (id, _, _) = create_endpoint(&s, create(Some(name))).await;
        let message = condition(&s, &id, "Ready", ("False", reason)).await;
        assert!(message.contains(name), "{message}");
        assert!(!message.contains("PRIVATE KEY"), "{message}");
        condition(&s, &id, "ClientCertificateReady", ("False", reason)).await;
        refused.push(id);
    }
    let handshakes = receiver.refused.load(Ordering::SeqCst);
    s.op.ingest(ORG, "a.b", json!({"n": 3})).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in &refused {
        let deliveries = s.deliveries(id).await;
        assert_eq!(deliveries.len(), 1);
        assert_eq!(deliveries[0]["state"], "pending", "{}", deliveries[0]);
        assert_eq!(deliveries[0]["attempts"], 0, "{}", deliveries[0]);
    }
    assert_eq!(receiver.refused.load(Ordering::SeqCst), handshakes);
    assert_eq!(receiver.accepted().len(), 1);

    // The missing Secret appears: its endpoint's waiting delivery goes out with it.
    tls_secret(
        &s.client,
        &s.ns,
        "later-tls",
        "kubernetes.io/tls",
        &capy.cert,
        &capy.key,
    )
    .await;
    s.wait_delivery(&refused[0], "delivered once the Secret exists", |d| {
        d["state"] == "succeeded"
    })
    .await;
    assert_eq!(receiver.accepted().len(), 2);
    condition(&s, &refused[0], "Ready", ("True", "Reconciled")).await;
}

/// tinyproxy (Debian's, unpacked by hack/egress-proxy.sh) on a loopback port: a real HTTP CONNECT
/// proxy that requires credentials and logs every request line.
struct Tinyproxy {
    port: u16,
    log: std::path::PathBuf,
    child: Option<tokio::process::Child>,
    _dir: tempfile::TempDir,
}

/// The proxy's credentials in the tests: they must reach the proxy and nowhere else.
const PROXY_USER: &str = "capy";
const PROXY_PASSWORD: &str = "proxy-hunter2";

impl Tinyproxy {
    /// The executable: `CAPY_TINYPROXY`, else what `hack/egress-proxy.sh` unpacks (once, cached).
    fn executable() -> std::path::PathBuf {
        if let Some(path) = std::env::var_os("CAPY_TINYPROXY").filter(|p| !p.is_empty()) {
            return path.into();
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/hack/egress-proxy.sh");
        let out = std::process::Command::new(script)
            .output()
            .expect("hack/egress-proxy.sh runs");
        assert!(
            out.status.success(),
            "hack/egress-proxy.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().into()
    }

    /// Starts it allowing CONNECT to `connect_ports` (tinyproxy's default is 443 and 563 only).
    async fn start(connect_ports: &[u16]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let log = dir.path().join("tinyproxy.log");
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 100\nLogFile \"{}\"\nLogLevel Connect\n\
             Allow 127.0.0.1\nBasicAuth {PROXY_USER} {PROXY_PASSWORD}\n",
            log.display()
        );
        for p in connect_ports {
            conf.push_str(&format!("ConnectPort {p}\n"));
        }
        let conf_path = dir.path().join("tinyproxy.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = tokio::process::Command::new(Self::executable())
            .arg("-d")
            .arg("-c")
            .arg(&conf_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("tinyproxy starts");
        support::wait_for("tinyproxy listening", Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()
        })
        .await;
        Self {
            port,
            log,
            child: Some(child),
            _dir: dir,
        }
    }

    /// `--egress-proxy`'s value, credentials included.
    fn url(&self) -> String {
        format!("http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{}", self.port)
    }

    /// The targets of every CONNECT the proxy was asked for, from its log
    /// (`Request (file descriptor 5): CONNECT 127.0.0.1:8443 HTTP/1.1`).
    fn connects(&self) -> Vec<String> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter_map(|line| line.split_once("): CONNECT ").map(|(_, rest)| rest))
            .filter_map(|rest| rest.split(' ').next())
            .map(str::to_string)
            .collect()
    }

    /// Every request line the proxy logged (CONNECT or any other method).
    fn requests(&self) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines().filter(|line| line.contains(": Request (")).count()
    }

    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }
}

/// Every CONNECT names an IP address and port, never a host name: the proxy resolved nothing.
fn connects_by_address(connects: &[String]) -> Result<(), String> {
    match connects.iter().find(|t| t.parse::<std::net::SocketAddr>().is_err()) {
        Some(named) => Err(format!("the proxy was asked to CONNECT to {named}")),
        None if connects.is_empty() => Err("the proxy was asked for nothing".into()),
        None => Ok(()),
    }
}

#[tokio::test]
async fn deliveries_tunnel_through_a_real_proxy_to_the_checked_address() {
    let pki = TestPki::new();
    let plain = Receiver::start(vec![]).await;
    let tls = MtlsReceiver::start_for(&pki, "localhost").await;
    let mut proxy = Tinyproxy::start(&[plain.addr.port(), tls.port]).await;
    let s = setup(
        "egress",
        Options {
            receiver_roots_pem: pki.ca.pem().into_bytes(),
            egress_proxy: Some(capy_webhooks::delivery::egress::EgressProxy::parse(&proxy.url()).unwrap()),
            ..Options::default()
        },
    )
    .await;
    let capy = pki.issue(&[], "capy-webhooks-client", rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    tls_secret(
        &s.client,
        &s.ns,
        "client-tls",
        "kubernetes.io/tls",
        &capy.cert,
        &capy.key,
    )
    .await;

    // Both receivers are named `localhost`: the dispatcher resolves the name and checks it.
    let plain_url = format!("http://localhost:{}/plain", plain.addr.port());
    let (plain_id, plain_secret, _) = create_endpoint(&s, json!({"url": plain_url})).await;
    let (tls_id, tls_secret_text, _) =
        create_endpoint(&s, json!({"url": tls.url(), "client_certificate_secret": "client-tls"})).await;
    condition(
        &s,
        &tls_id,
        "ClientCertificateReady",
        ("True", "ClientCertificateAvailable"),
    )
    .await;
    s.op.ingest(ORG, "a.b", json!({"through": "the proxy"})).await;

    // Plain HTTP is tunnelled too (not forwarded), with the original Host and a valid signature.
    let received = wait_received(&plain, 1).await;
    assert_eq!(received[0].path, "/plain");
    assert_eq!(received[0].header("host"), format!("localhost:{}", plain.addr.port()));
    verify(&plain_secret, &received[0]).expect("the signature verifies");
    // TLS inside the tunnel: the certificate names only `localhost` (SNI and verification for the
    // original name), and the receiver required and got the endpoint's client certificate.
    let (common_name, request) = support::wait_for("a delivery over mutual TLS through the proxy", WAIT, || async {
        tls.accepted().into_iter().next()
    })
    .await;
    assert_eq!(common_name, "capy-webhooks-client");
    assert_eq!(request.header("host"), format!("localhost:{}", tls.port));
    verify(&tls_secret_text, &request).expect("the signature verifies");
    for id in [&plain_id, &tls_id] {
        s.wait_delivery(id, "delivered through the proxy", |d| d["state"] == "succeeded")
            .await;
    }

    // The proxy was asked for checked addresses only, and for both receivers.
    let connects = proxy.connects();
    connects_by_address(&connects).unwrap();
    for port in [plain.addr.port(), tls.port] {
        assert!(
            connects.iter().any(|t| t.ends_with(&format!(":{port}"))),
            "no CONNECT to port {port}: {connects:?}"
        );
    }
    assert_eq!(
        proxy.requests(),
        connects.len(),
        "every request to the proxy was a CONNECT"
    );

    // The proxy stops: a classified, retried connection failure that names neither its address
    // nor its credentials.
    proxy.stop().await;
    s.op.ingest(ORG, "a.b", json!({"n": 2})).await;
    let failed = s
        .wait_delivery(&plain_id, "attempts failing without the proxy", |d| {
            d["attempts"].as_u64() >= Some(2)
        })
        .await;
    assert_ne!(failed["state"], "succeeded", "{failed}");
    let error = failed["last_error"].as_str().unwrap();
    assert!(
        error.starts_with("connection failed: connection to localhost failed: the egress proxy could not be reached"),
        "{error}"
    );
    assert!(
        !error.contains(PROXY_PASSWORD) && !error.contains(&proxy.port.to_string()),
        "{error}"
    );
    assert_eq!(plain.received().len(), 1);
}

#[tokio::test]
async fn the_guard_refuses_a_host_before_the_proxy_is_asked() {
    let plain = Receiver::start(vec![]).await;
    let proxy = Tinyproxy::start(&[plain.addr.port()]).await;
    let s = setup(
        "egress-guard",
        Options {
            allow_private_targets: false,
            egress_proxy: Some(capy_webhooks::delivery::egress::EgressProxy::parse(&proxy.url()).unwrap()),
            ..Options::default()
        },
    )
    .await;
    // `localhost` resolves to loopback, refused when private targets are not allowed.
    let url = format!("http://localhost:{}/refused", plain.addr.port());
    let (id, _, _) = create_endpoint(&s, json!({"url": url})).await;
    s.op.ingest(ORG, "a.b", json!({"n": 1})).await;
    let refused = s
        .wait_delivery(&id, "an attempt refused by the guard", |d| {
            d["attempts"].as_u64() >= Some(1)
        })
        .await;
    let error = refused["last_error"].as_str().unwrap();
    assert!(
        error.contains("loopback address is not an allowed webhook target"),
        "{error}"
    );
    assert_eq!(proxy.requests(), 0, "the proxy was asked: {:?}", proxy.connects());
    assert!(plain.received().is_empty());
}

/// reqwest's own proxy support names the host in CONNECT: the check above catches it, which is
/// why the tunnel is the dispatcher's own.
#[tokio::test]
async fn reqwest_proxy_names_the_host_and_fails_the_address_check() {
    let pki = TestPki::new();
    let tls = MtlsReceiver::start_for(&pki, "localhost").await;
    let proxy = Tinyproxy::start(&[tls.port]).await;
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy.url()).unwrap())
        .build()
        .unwrap();
    // The handshake fails (the test CA is not trusted here); the CONNECT is logged before it.
    let _ = client.post(tls.url()).body("{}").send().await;
    let connects = support::wait_for("reqwest's CONNECT in the log", WAIT, || async {
        Some(proxy.connects()).filter(|c| !c.is_empty())
    })
    .await;
    assert_eq!(connects, vec![format!("localhost:{}", tls.port)]);
    let err = connects_by_address(&connects).unwrap_err();
    assert!(err.contains("localhost"), "{err}");
}

/// One attempt through the egress proxy at `proxy_url` by a [`Sender`] of `config` (loopback
/// targets and plain HTTP allowed), outside any operator.
async fn send_through(
    proxy_url: &str,
    target: &str,
    config: capy_webhooks::delivery::sender::SenderConfig,
) -> capy_webhooks::delivery::sender::AttemptResult {
    use capy_webhooks::delivery::sender::{Sender, SenderConfig};
    let sender = Sender::new(SenderConfig {
        allow_http: true,
        policy: capy_webhooks::delivery::ssrf::TargetPolicy {
            allow_private: true,
            allow_metadata: false,
        },
        egress_proxy: Some(capy_webhooks::delivery::egress::EgressProxy::parse(proxy_url).unwrap()),
        ..config
    })
    .unwrap();
    let ring = capy_webhooks::signing::KeyRing {
        current: capy_webhooks::signing::SigningSecret::generate(),
        rotation: 0,
        previous: vec![],
    };
    sender.send(target, "msg_1", b"{}", &ring, jiff::Timestamp::now()).await
}

/// A proxy refusing CONNECT (wrong credentials, a port it does not allow): a retryable
/// connection error naming its answer, never the credentials. Through the tunnel, answers are
/// read as without it.
#[tokio::test]
async fn a_proxy_refusing_connect_is_a_classified_connection_error() {
    use capy_webhooks::delivery::outcome::AttemptOutcome;
    let plain = Receiver::start(vec![]).await;
    let proxy = Tinyproxy::start(&[plain.addr.port()]).await;
    let send = |proxy_url: String, target: String| async move {
        send_through(&proxy_url, &target, Default::default()).await.outcome
    };
    let wrong = format!("http://{PROXY_USER}:not-the-password@127.0.0.1:{}", proxy.port);
    let outcome = send(wrong, plain.url("/hook")).await;
    let AttemptOutcome::ConnectError(error) = outcome else {
        panic!("wrong credentials: {outcome:?}")
    };
    // tinyproxy answers 401 to wrong credentials (407 to none).
    assert!(
        error.ends_with("the egress proxy refused CONNECT with HTTP 401 (check the proxy's credentials)"),
        "{error}"
    );
    assert!(!error.contains("not-the-password"), "{error}");
    // tinyproxy refuses CONNECT to a port it was not told to allow.
    let outcome = send(proxy.url(), "http://127.0.0.1:9/hook".into()).await;
    let AttemptOutcome::ConnectError(error) = outcome else {
        panic!("a refused port: {outcome:?}")
    };
    assert!(
        error.ends_with("the egress proxy refused CONNECT with HTTP 403"),
        "{error}"
    );
    assert!(!error.contains(PROXY_PASSWORD), "{error}");
    // The right credentials and port: delivered.
    assert_eq!(
        send(proxy.url(), plain.url("/hook")).await,
        AttemptOutcome::Success { status: 200 }
    );
    assert_eq!(plain.received().len(), 1);

    // Retry-After and the body excerpt are read through the tunnel, and the attempt timeout
    // covers a slow receiver.
    plain.script(vec![Answer::RetryAfter(429, 7), Answer::Slow(Duration::from_secs(3))]);
    let limited = send_through(&proxy.url(), &plain.url("/hook"), Default::default()).await;
    assert_eq!(
        limited.outcome,
        AttemptOutcome::HttpFailure {
            status: 429,
            retry_after: Some(Duration::from_secs(7))
        }
    );
    assert_eq!(limited.response_excerpt.as_deref(), Some("slow down"));
    let short = capy_webhooks::delivery::sender::SenderConfig {
        total_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let slow = send_through(&proxy.url(), &plain.url("/hook"), short).await;
    assert_eq!(slow.outcome, AttemptOutcome::Timeout);
    assert!(slow.duration < Duration::from_secs(2), "{:?}", slow.duration);
}

/// A proxy that accepts the connection and never answers: the connect timeout ends the attempt.
#[tokio::test]
async fn a_silent_proxy_is_a_timeout() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let config = capy_webhooks::delivery::sender::SenderConfig {
        connect_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let result = send_through(&format!("http://127.0.0.1:{port}"), "http://127.0.0.1:9/hook", config).await;
    assert_eq!(
        result.outcome,
        capy_webhooks::delivery::outcome::AttemptOutcome::Timeout
    );
    assert!(result.duration < Duration::from_secs(2), "{:?}", result.duration);
}

/// Whether any delivery-log segment in `ns` holds `needle` in an entry (segments are packed, so
/// they are decoded as the operator reads them).
async fn log_holds(client: &Client, ns: &str, needle: &str) -> bool {
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), ns);
    let selector = format!(
        "{}={}",
        capy_webhooks::resources::COMPONENT_LABEL,
        capy_webhooks::delivery_log::COMPONENT
    );
    cms.list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
        .iter()
        .any(|cm| {
            capy_webhooks::delivery_log::segment_entries(cm)
                .unwrap()
                .values()
                .any(|v| v.contains(needle))
        })
}

#[tokio::test]
async fn erasing_an_event_removes_its_payload_from_every_delivery_and_configmap() {
    // A retry an hour away: the failing endpoint's delivery stays pending.
    let s = setup(
        "erase",
        Options {
            schedule: "0s,1h",
            ..Options::default()
        },
    )
    .await;
    let ok = Receiver::start(vec![]).await;
    let failing = Receiver::start((0..8).map(|_| Answer::Status(500)).collect()).await;
    let (ok_id, _) = s.endpoint(&ok.url("/"), &[]).await;
    let (failing_id, _) = s.endpoint(&failing.url("/"), &[]).await;
    let (status, accepted) =
        s.op.ingest(ORG, "user.deleted", json!({"email": "ada-erase@example.com"}))
            .await;
    assert_eq!(status, 202, "{accepted}");
    let event_id = accepted["id"].as_str().unwrap().to_string();
    let (status, kept) =
        s.op.ingest(ORG, "user.created", json!({"email": "grace@example.com"}))
            .await;
    assert_eq!(status, 202, "{kept}");
    support::wait_for("both deliveries to the healthy endpoint", WAIT, || async {
        let done = s.deliveries(&ok_id).await;
        (done.len() == 2 && done.iter().all(|d| d["state"] == "succeeded")).then_some(())
    })
    .await;
    support::wait_for("a first failed attempt of both", WAIT, || async {
        let tried = s.deliveries(&failing_id).await;
        (tried.len() == 2 && tried.iter().all(|d| d["attempts"] == 1 && d["state"] == "pending")).then_some(())
    })
    .await;
    assert!(log_holds(&s.client, &s.ns, "ada-erase@example.com").await);

    // Not for another organization, a portal session, or an id no delivery carries.
    let events = |org: &str, id: &str| format!("{}/{org}/events/{id}", s.op.base);
    let (status, body, _) =
        s.op.call("DELETE", &events("org_other", &event_id), Some(&s.key), None)
            .await;
    assert_eq!(status, 403, "{body}");
    let (status, body, _) =
        s.op.call("DELETE", &events(ORG, "evt_unknown"), Some(&s.key), None)
            .await;
    assert_eq!(status, 404, "{body}");
    let (status, session, _) =
        s.op.call(
            "POST",
            &format!("{}/{ORG}/portal-sessions", s.op.base),
            Some(&s.key),
            None,
        )
        .await;
    assert_eq!(status, 201, "{session}");
    let portal = session["token"].as_str().unwrap();
    let (status, body, _) = s.op.call("DELETE", &events(ORG, &event_id), Some(portal), None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("portal session"), "{body}");

    let (status, erased, _) = s.op.call("DELETE", &events(ORG, &event_id), Some(&s.key), None).await;
    assert_eq!(status, 200, "{erased}");
    assert_conforms("Erased", &erased);
    assert_eq!(erased, json!({"event_id": event_id, "deliveries": 2}));
    // The answer comes once the tombstone is durable; the segment that held the payload is
    // deleted right after.
    support::wait_for(
        "the payload's bytes gone from every ConfigMap",
        Duration::from_secs(5),
        || async { (!log_holds(&s.client, &s.ns, "ada-erase@example.com").await).then_some(()) },
    )
    .await;
    assert!(
        log_holds(&s.client, &s.ns, "grace@example.com").await,
        "the other event stays"
    );

    let listed = s.deliveries(&ok_id).await;
    let erased_one = listed.iter().find(|d| d["event_type"] == "user.deleted").unwrap();
    assert_eq!(
        erased_one["state"], "succeeded",
        "a finished delivery keeps its outcome"
    );
    assert!(erased_one["payload"].is_null(), "{erased_one}");
    let other = listed.iter().find(|d| d["event_type"] != "user.deleted").unwrap();
    assert_eq!(other["payload"]["data"]["email"], "grace@example.com");
    let pending = s.deliveries(&failing_id).await;
    let pending = pending.iter().find(|d| d["event_type"] == "user.deleted").unwrap();
    assert_eq!(pending["state"], "failed", "{pending}");
    assert!(pending["payload"].is_null());
    assert!(pending["last_error"].as_str().unwrap().contains("erased"), "{pending}");
    assert!(pending["next_attempt_at"].is_null());

    // Nothing of it can be sent again.
    let retry = s.op.url(
        ORG,
        &format!("/{failing_id}/deliveries/{}/retry", pending["id"].as_str().unwrap()),
    );
    let (status, body, _) = s.op.call("POST", &retry, Some(&s.key), None).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("erased"), "{body}");
    // Idempotent.
    let (status, again, _) = s.op.call("DELETE", &events(ORG, &event_id), Some(&s.key), None).await;
    assert_eq!((status.as_u16(), again), (200, erased));
    assert_eq!(
        failing.received().len(),
        2,
        "the erased delivery was never attempted again"
    );
    let still = s.deliveries(&failing_id).await;
    let other = still.iter().find(|d| d["event_type"] != "user.deleted").unwrap();
    assert_eq!(
        other["state"], "pending",
        "the other event's delivery is untouched: {other}"
    );
}

#[tokio::test]
async fn payloads_past_their_retention_are_erased_and_the_records_stay() {
    let s = setup(
        "retention",
        Options {
            payload_retention: Some(Duration::from_secs(2)),
            ..Options::default()
        },
    )
    .await;
    let receiver = Receiver::start(vec![]).await;
    let (id, _) = s.endpoint(&receiver.url("/"), &[]).await;
    let (status, _) =
        s.op.ingest(ORG, "a.b", json!({"marker": "retained-for-two-seconds"}))
            .await;
    assert_eq!(status, 202);
    let delivered = s.wait_delivery(&id, "delivered", |d| d["state"] == "succeeded").await;
    assert_eq!(delivered["payload"]["data"]["marker"], "retained-for-two-seconds");
    assert!(log_holds(&s.client, &s.ns, "retained-for-two-seconds").await);
    let expired = s
        .wait_delivery(&id, "the payload erased by retention", |d| d["payload"].is_null())
        .await;
    assert_eq!(expired["state"], "succeeded");
    assert_eq!(expired["id"], delivered["id"]);
    support::wait_for("the payload gone from the ConfigMaps", WAIT, || async {
        (!log_holds(&s.client, &s.ns, "retained-for-two-seconds").await).then_some(())
    })
    .await;
}
/// Endpoint filters in CEL end to end: an endpoint with a filter gets only the events it gives
/// `true` for (one without gets them all, so an event that is missing was not merely late); a
/// filter that does not compile is a 400 with its position; the filter shows in the list,
/// and an update changes or clears it.
#[tokio::test]
async fn a_filter_lets_only_matching_events_through_and_can_be_changed_and_cleared() {
    let s = setup("filter", Options::default()).await;
    let (filtered_rx, all_rx) = (Receiver::start(vec![]).await, Receiver::start(vec![]).await);
    let filter = "event.data.region.startsWith('eu-') && event.data.tags.exists(t, t == 'prod')";
    let (status, created, _) =
        s.op.call(
            "POST",
            &s.op.url(ORG, ""),
            Some(&s.key),
            Some(json!({"url": filtered_rx.url("/f"), "filter": filter})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_conforms("EndpointWithSecret", &created);
    assert_eq!(created["webhook_endpoint"]["filter"], filter);
    let id = created["webhook_endpoint"]["id"].as_str().unwrap().to_string();
    s.endpoint(&all_rx.url("/a"), &[]).await;

    // The list shows it (the contract has no GET of one endpoint); the CR holds it in spec.filter.
    let (_, list, _) = s.op.call("GET", &s.op.url(ORG, ""), Some(&s.key), None).await;
    assert_conforms("EndpointList", &list);
    let listed: Vec<_> = list["webhook_endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["filter"].clone())
        .collect();
    assert!(
        listed.contains(&json!(filter)) && listed.contains(&Value::Null),
        "{list}"
    );
    let api: Api<WebhookEndpoint> = Api::namespaced(s.client.clone(), &s.ns);
    assert_eq!(api.get(&id).await.unwrap().spec.filter.as_deref(), Some(filter));

    // Ingest: the answer counts the deliveries, two when the filter matches, one otherwise. A
    // missing field (`tags`) and a field of another type (`region`) are no match, not an error.
    let events = [
        (json!({"region": "eu-west-1", "tags": ["prod"]}), true),
        (json!({"region": "us-east-1", "tags": ["prod"]}), false),
        (json!({"region": "eu-west-1", "tags": ["dev"]}), false),
        (json!({"region": "eu-west-1"}), false),
        (json!({"region": 7, "tags": ["prod"]}), false),
        (json!({"region": "eu-central-1", "tags": ["dev", "prod"]}), true),
    ];
    for (data, matches) in &events {
        let (status, accepted) = s.op.ingest(ORG, "database.created", data.clone()).await;
        assert_eq!(status, 202, "{accepted}");
        assert_eq!(accepted["deliveries"], if *matches { 2 } else { 1 }, "{data}");
    }
    wait_received(&all_rx, events.len()).await;
    let mut wanted: Vec<_> = events.iter().filter(|(_, m)| *m).map(|(d, _)| d.clone()).collect();
    wanted.sort_by_key(|d| d.to_string());
    let got = wait_received(&filtered_rx, wanted.len()).await;
    let mut seen: Vec<_> = got.iter().map(|r| r.json()["data"].clone()).collect();
    seen.sort_by_key(|d| d.to_string());
    assert_eq!(seen, wanted, "the filtered endpoint got exactly the matching events");
    let errors = s.op.metrics.encode();
    assert!(
        errors.lines().any(
            |l| l.starts_with("capy_webhooks_filter_errors_total{reason=\"missing_field\"} ") && !l.ends_with(" 0")
        ),
        "the missing field is counted:\n{errors}"
    );

    // Refused with the position: a syntax error, a type error, a result that is not a bool.
    for (bad, want) in [
        ("event.data.region ==", "filter has a syntax error at line 1, column "),
        (
            "event.type == 1",
            "filter has a type error at line 1, column 12: no matching overload for '=='",
        ),
        ("event.type", "a filter must give a bool"),
        (
            "event.data.tags.exists(a, event.data.tags.exists(b, a == b))",
            "filter is too costly",
        ),
    ] {
        for (method, url) in [("POST", s.op.url(ORG, "")), ("PATCH", s.op.url(ORG, &format!("/{id}")))] {
            let body = if method == "POST" {
                json!({"url": filtered_rx.url("/f"), "filter": bad})
            } else {
                json!({"filter": bad})
            };
            let (status, err, _) = s.op.call(method, &url, Some(&s.key), Some(body)).await;
            assert_eq!(status, 400, "{method} {bad}: {err}");
            assert!(err["error"].as_str().unwrap().contains(want), "{method} {bad}: {err}");
        }
    }

    // Change it: now only `billing.*` events with a big amount.
    let changed = "event.type.startsWith('billing.') && event.data.amount >= 1000";
    let (status, updated, _) =
        s.op.call(
            "PATCH",
            &s.op.url(ORG, &format!("/{id}")),
            Some(&s.key),
            Some(json!({"filter": changed})),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["webhook_endpoint"]["filter"], changed);
    // The dispatcher's cache follows the CR through a watch: probe until it has the new filter.
    support::wait_for("the changed filter in force", WAIT, || async {
        let (_, accepted) = s.op.ingest(ORG, "billing.charged", json!({"amount": 5000})).await;
        (accepted["deliveries"] == 2).then_some(())
    })
    .await;
    let (_, accepted) = s.op.ingest(ORG, "billing.charged", json!({"amount": 10})).await;
    assert_eq!(accepted["deliveries"], 1);
    let (_, accepted) =
        s.op.ingest(
            ORG,
            "database.created",
            json!({"region": "eu-west-1", "tags": ["prod"]}),
        )
        .await;
    assert_eq!(accepted["deliveries"], 1, "the old filter is gone");

    // Clear it: the field goes from the object and the CR, and every event is delivered.
    let (status, cleared, _) =
        s.op.call(
            "PATCH",
            &s.op.url(ORG, &format!("/{id}")),
            Some(&s.key),
            Some(json!({"filter": null})),
        )
        .await;
    assert_eq!(status, 200, "{cleared}");
    assert!(cleared["webhook_endpoint"].get("filter").is_none(), "{cleared}");
    assert!(api.get(&id).await.unwrap().spec.filter.is_none());
    support::wait_for("no filter in force", WAIT, || async {
        let (_, accepted) = s.op.ingest(ORG, "anything.at_all", json!({})).await;
        (accepted["deliveries"] == 2).then_some(())
    })
    .await;
}

/// The README's filter block (`<!-- filter-test: readme-rest -->`), verbatim, with bash, curl and
/// jq against this operator: `API` and `AUTH` as its walk-through with curl sets them.
#[tokio::test]
async fn the_readme_filter_commands_work_verbatim() {
    let s = setup("filter-readme", Options::default()).await;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let after = readme
        .split_once("<!-- filter-test: readme-rest -->")
        .expect("the README marks its block")
        .1;
    let block = after.split_once("```sh\n").expect("a sh block after the marker").1;
    let script = block.split_once("\n```").expect("the block ends").0;
    let out = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &format!("{script}\necho \"F=$F\"")])
        .env("API", format!("{}/{ORG}", s.op.base))
        .env("AUTH", format!("Authorization: Bearer {}", s.key))
        .output()
        .await
        .expect("bash runs");
    let stdout = support::ok("the README's filter commands", out);
    let id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("F="))
        .expect("the block names its endpoint");
    assert!(id.starts_with("ep-"), "{stdout}");
    assert!(
        stdout.contains(r#""filter": "event.data.size_bytes > 1000000000""#),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#""error": "filter has a syntax error at line 1, column 14: "#),
        "{stdout}"
    );
    let api: Api<WebhookEndpoint> = Api::namespaced(s.client.clone(), &s.ns);
    assert!(
        api.get(id).await.unwrap().spec.filter.is_none(),
        "the last command cleared it"
    );
}
