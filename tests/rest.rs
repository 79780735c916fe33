//! The REST facade end to end: real API server, real controller, real HTTP.

mod support;

use std::sync::Arc;
use std::time::Duration;

use capy_webhooks::auth::api_keys;
use capy_webhooks::auth::clerk::testing::TestIssuer;
use capy_webhooks::resources::{ORGANIZATION_LABEL, WebhookEndpoint};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::assert_conforms;
use support::operator::{ISSUER, Operator, Options};
use support::receiver::{Answer, Receiver};

const ORG: &str = "org_alpha";
const OTHER_ORG: &str = "org_beta";

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<_> = v.as_object().expect("object").keys().cloned().collect();
    k.sort();
    k
}

const ENDPOINT_KEYS: [&str; 8] = [
    "created_at",
    "description",
    "event_types",
    "id",
    "is_active",
    "organization_id",
    "updated_at",
    "url",
];

async fn setup(prefix: &str, with_controller: bool) -> (Client, String, Operator, TestIssuer) {
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, prefix).await;
    let issuer = TestIssuer::new("kid-1");
    let jwks_url = support::operator::serve_jwks(issuer.jwks_json()).await;
    let opts = Options {
        controller: with_controller,
        controller_wait: if with_controller {
            Duration::from_secs(20)
        } else {
            Duration::from_secs(1)
        },
        jwks_url: Some(jwks_url),
        ..Options::default()
    };
    let op = Operator::start(&client, &ns, opts).await;
    (client, ns, op, issuer)
}

fn session_claims(org: &str, exp_offset: i64) -> Value {
    let now = jiff::Timestamp::now().as_second();
    json!({"sub": "user_1", "iss": ISSUER, "iat": now, "nbf": now - 10, "exp": now + exp_offset, "org_id": org, "sid": "sess_1"})
}

#[tokio::test]
async fn every_route_works_with_the_documented_shapes() {
    let (client, ns, op, issuer) = setup("rest", true).await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    let k = Some(key.as_str());

    // Create.
    let body = json!({"url": "https://hooks.example.com/a", "description": "first", "event_types": ["database.*"]});
    let (status, created, _) = op.call("POST", &op.url(ORG, ""), k, Some(body)).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(keys(&created), ["plaintext_secret", "webhook_endpoint"]);
    assert_eq!(keys(&created["webhook_endpoint"]), ENDPOINT_KEYS);
    assert_conforms("EndpointWithSecret", &created);
    let ep = &created["webhook_endpoint"];
    let id = ep["id"].as_str().unwrap().to_string();
    assert_eq!(ep["organization_id"], ORG);
    assert_eq!(ep["is_active"], true);
    assert_eq!(ep["event_types"], json!(["database.*"]));
    let secret = created["plaintext_secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    // The plaintext is the controller's secret.
    let stored = Api::<Secret>::namespaced(client.clone(), &ns)
        .get(&format!("{id}-signing"))
        .await
        .unwrap();
    assert_eq!(stored.data.unwrap()["signing-secret"].0, secret.as_bytes());

    // A session token works as well as an API key.
    let token = issuer.token(&session_claims(ORG, 300));
    let (status, listed, _) = op.call("GET", &op.url(ORG, ""), Some(&token), None).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(keys(&listed), ["webhook_endpoints"]);
    let items = listed["webhook_endpoints"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    let mut with_health: Vec<&str> = ENDPOINT_KEYS.to_vec();
    with_health.push("health");
    with_health.sort();
    assert_eq!(keys(&items[0]), with_health);
    assert_eq!(items[0]["health"], "unknown");
    assert_conforms("EndpointList", &listed);
    assert!(!listed.to_string().contains(&secret), "list never shows the secret");

    // Update: only the given field changes, and updated_at moves (whole seconds).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, updated, _) = op
        .call(
            "PATCH",
            &op.url(ORG, &format!("/{id}")),
            k,
            Some(json!({"is_active": false})),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(keys(&updated), ["webhook_endpoint"]);
    assert_conforms("EndpointResponse", &updated);
    let u = &updated["webhook_endpoint"];
    assert_eq!(u["is_active"], false);
    assert_eq!(u["description"], "first");
    assert_eq!(u["url"], "https://hooks.example.com/a");
    assert_eq!(u["created_at"], ep["created_at"]);
    assert!(
        u["updated_at"].as_str().unwrap() > ep["updated_at"].as_str().unwrap(),
        "{u}"
    );
    assert!(!updated.to_string().contains("whsec_"));
    // Read-your-writes through the cache.
    let (_, listed, _) = op.call("GET", &op.url(ORG, ""), k, None).await;
    assert_eq!(listed["webhook_endpoints"][0]["is_active"], false);
    assert_eq!(listed["webhook_endpoints"][0]["health"], "disabled");

    // Rotate: a new secret, stored by the controller.
    let (status, rotated, _) = op
        .call("POST", &op.url(ORG, &format!("/{id}/rotate-secret")), k, None)
        .await;
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(keys(&rotated), ["plaintext_secret", "webhook_endpoint"]);
    assert_conforms("EndpointWithSecret", &rotated);
    let new_secret = rotated["plaintext_secret"].as_str().unwrap();
    assert_ne!(new_secret, secret);
    let stored = Api::<Secret>::namespaced(client.clone(), &ns)
        .get(&format!("{id}-signing"))
        .await
        .unwrap();
    assert_eq!(stored.data.unwrap()["signing-secret"].0, new_secret.as_bytes());

    // Deliveries.
    let (status, deliveries, _) = op
        .call("GET", &op.url(ORG, &format!("/{id}/deliveries?limit=10")), k, None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(deliveries, json!({"deliveries": []}));
    assert_conforms("DeliveryList", &deliveries);
    for bad in ["0", "1001", "abc", "-5"] {
        let (status, body, _) = op
            .call("GET", &op.url(ORG, &format!("/{id}/deliveries?limit={bad}")), k, None)
            .await;
        assert_eq!(status, 400, "limit={bad}");
        assert_conforms("Error", &body);
    }
    let (status, _, _) = op.call("GET", &op.url(ORG, "/ep-unknown/deliveries"), k, None).await;
    assert_eq!(status, 404);

    // Delete, then 404.
    let (status, deleted, _) = op.call("DELETE", &op.url(ORG, &format!("/{id}")), k, None).await;
    assert_eq!(status, 200);
    assert_eq!(deleted, json!({"deleted": true}));
    let (status, body, _) = op.call("DELETE", &op.url(ORG, &format!("/{id}")), k, None).await;
    assert_eq!(status, 404);
    assert_conforms("Error", &body);
    for (method, rest) in [("PATCH", ""), ("POST", "/rotate-secret"), ("GET", "/deliveries")] {
        let body = (method == "PATCH").then(|| json!({"description": "x"}));
        let (status, _, _) = op.call(method, &op.url(ORG, &format!("/{id}{rest}")), k, body).await;
        assert_eq!(status, 404, "{method} {rest} after delete");
    }
}

#[tokio::test]
async fn authentication_matrix_over_every_route() {
    let (client, ns, op, issuer) = setup("authz", true).await;
    let (_, org_key) = op.mint_key(&client, &ns, ORG, None).await;
    let (_, other_key) = op.mint_key(&client, &ns, OTHER_ORG, None).await;
    // A project key is accepted on its own organization (see the next test), refused on any other.
    let (_, project_key) = op.mint_key(&client, &ns, OTHER_ORG, Some("prj_1")).await;
    let (revoked, revoked_key) = op.mint_key(&client, &ns, ORG, None).await;
    // The revoked key works until it is revoked, then stops within seconds.
    let (status, _, _) = op.call("GET", &op.url(ORG, ""), Some(&revoked_key), None).await;
    assert_eq!(status, 200);
    assert!(api_keys::revoke_key(&client, &ns, &revoked.id).await.unwrap());
    support::wait_for("revoked key refused", Duration::from_secs(10), || async {
        let (status, _, _) = op.call("GET", &op.url(ORG, ""), Some(&revoked_key), None).await;
        (status == 401).then_some(())
    })
    .await;

    let (status, created, _) = op
        .call(
            "POST",
            &op.url(ORG, ""),
            Some(&org_key),
            Some(json!({"url": "https://hooks.example.com/m"})),
        )
        .await;
    assert_eq!(status, 201);
    let id = created["webhook_endpoint"]["id"].as_str().unwrap().to_string();

    let unknown_key = format!("capy_live_{}", "A".repeat(40));
    let expired = issuer.token(&session_claims(ORG, -600));
    let foreign_issuer = {
        let mut c = session_claims(ORG, 300);
        c["iss"] = json!("https://evil.example.com");
        issuer.token(&c)
    };
    let other_org_jwt = issuer.token(&session_claims(OTHER_ORG, 300));
    let alg_none = TestIssuer::none_token(&session_claims(ORG, 300));
    let hs256 = TestIssuer::hs256_token(&session_claims(ORG, 300));
    let cases: Vec<(&str, Option<String>, u16)> = vec![
        ("no header", None, 401),
        ("malformed header", Some("Basic dXNlcjpwYXNz".into()), 401),
        ("unknown key", Some(format!("Bearer {unknown_key}")), 401),
        ("revoked key", Some(format!("Bearer {revoked_key}")), 401),
        ("key of another organization", Some(format!("Bearer {other_key}")), 403),
        (
            "project-scoped key of another organization",
            Some(format!("Bearer {project_key}")),
            403,
        ),
        ("expired JWT", Some(format!("Bearer {expired}")), 401),
        ("JWT from another issuer", Some(format!("Bearer {foreign_issuer}")), 401),
        (
            "JWT of another organization",
            Some(format!("Bearer {other_org_jwt}")),
            403,
        ),
        ("alg none", Some(format!("Bearer {alg_none}")), 401),
        ("HS256", Some(format!("Bearer {hs256}")), 401),
    ];
    let routes: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", op.url(ORG, ""), None),
        (
            "POST",
            op.url(ORG, ""),
            Some(json!({"url": "https://hooks.example.com/x"})),
        ),
        (
            "PATCH",
            op.url(ORG, &format!("/{id}")),
            Some(json!({"description": "hacked"})),
        ),
        ("DELETE", op.url(ORG, &format!("/{id}")), None),
        ("POST", op.url(ORG, &format!("/{id}/rotate-secret")), None),
        ("GET", op.url(ORG, &format!("/{id}/deliveries")), None),
        ("GET", op.url(ORG, &format!("/{id}/stats")), None),
    ];
    for (method, url, body) in &routes {
        for (case, header, expected) in &cases {
            let mut req = op.http.request(method.parse().unwrap(), url);
            if let Some(h) = header {
                req = req.header("authorization", h);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let res = req.send().await.unwrap();
            assert_eq!(res.status().as_u16(), *expected, "{case}: {method} {url}");
            assert_eq!(
                res.headers()["content-type"],
                "application/json",
                "{case}: {method} {url}"
            );
            let body: Value = res.json().await.unwrap();
            assert_conforms("Error", &body);
            let message = body["error"].as_str().unwrap();
            assert!(!message.is_empty());
            for secret in [&org_key, &other_key, &project_key, &revoked_key, &expired] {
                assert!(!message.contains(secret.as_str()), "{case}: error echoes a credential");
            }
        }
    }
    // Nothing above changed the endpoint, and the other organization cannot see it.
    let (_, listed, _) = op.call("GET", &op.url(ORG, ""), Some(&org_key), None).await;
    assert_eq!(listed["webhook_endpoints"].as_array().unwrap().len(), 1);
    assert_eq!(listed["webhook_endpoints"][0]["description"], "");
    let (_, theirs, _) = op.call("GET", &op.url(OTHER_ORG, ""), Some(&other_key), None).await;
    assert_eq!(theirs, json!({"webhook_endpoints": []}));
    // Their own key on their own path, but our id: 404, so ids do not leak.
    let (status, _, _) = op
        .call(
            "PATCH",
            &op.url(OTHER_ORG, &format!("/{id}")),
            Some(&other_key),
            Some(json!({"description": "x"})),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _, _) = op
        .call("DELETE", &op.url(OTHER_ORG, &format!("/{id}")), Some(&other_key), None)
        .await;
    assert_eq!(status, 404);
}

/// CapyDB's reference accepts an "org or project-scoped API key" on every route. Endpoints carry no
/// project, so a project key acts on every route of its own organization exactly as an
/// organization key does (it sees and manages the organization key's endpoints too, and the other
/// way round), and gets 403 on every route of another organization.
#[tokio::test]
async fn a_project_key_acts_on_every_route_of_its_own_organization_and_on_no_other() {
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, "projkey").await;
    let opts = Options {
        dispatcher: true,
        schedule: "0s",
        ..Options::default()
    };
    let op = Operator::start(&client, &ns, opts).await;
    let (_, org_key) = op.mint_key(&client, &ns, ORG, None).await;
    let (record, project_key) = op.mint_key(&client, &ns, ORG, Some("prj_1")).await;
    assert_eq!(record.project_id.as_deref(), Some("prj_1"));
    let (_, other_key) = op.mint_key(&client, &ns, OTHER_ORG, None).await;
    let (_, other_project_key) = op.mint_key(&client, &ns, OTHER_ORG, Some("prj_1")).await;
    let pk = Some(project_key.as_str());
    let ids = |list: &Value| -> Vec<String> {
        let mut ids: Vec<String> = list["webhook_endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };

    // Create (201, with the secret), and list: the organization key's endpoint is there too.
    let quiet = Receiver::start(Vec::new()).await;
    let org_id = op.create_endpoint(ORG, &org_key, &quiet.url("/org")).await;
    let receiver = Receiver::start(vec![Answer::Status(500)]).await;
    let (status, created, _) = op
        .call("POST", &op.url(ORG, ""), pk, Some(json!({"url": receiver.url("/prj")})))
        .await;
    assert_eq!(status, 201, "{created}");
    assert_conforms("EndpointWithSecret", &created);
    let id = created["webhook_endpoint"]["id"].as_str().unwrap().to_string();
    assert_eq!(created["webhook_endpoint"]["organization_id"], ORG);
    let mut both = vec![org_id.clone(), id.clone()];
    both.sort();
    for key in [&project_key, &org_key] {
        let (status, listed, _) = op.call("GET", &op.url(ORG, ""), Some(key), None).await;
        assert_eq!(status, 200, "{listed}");
        assert_conforms("EndpointList", &listed);
        assert_eq!(ids(&listed), both);
    }

    // Update, settings, rotate: on its own endpoint and on the organization key's.
    for target in [&id, &org_id] {
        let (status, body, _) = op
            .call(
                "PATCH",
                &op.url(ORG, &format!("/{target}")),
                pk,
                Some(json!({"description": "by a project key"})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["webhook_endpoint"]["description"], "by a project key");
        let (status, body, _) = op
            .call("POST", &op.url(ORG, &format!("/{target}/rotate-secret")), pk, None)
            .await;
        assert_eq!(status, 200, "{body}");
        assert_conforms("EndpointWithSecret", &body);
    }
    let settings = op.url(ORG, &format!("/{id}/settings"));
    let (status, body, _) = op
        .call("PATCH", &settings, pk, Some(json!({"headers": {"X-Source": "prj_1"}})))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = op.call("GET", &settings, pk, None).await;
    assert_eq!(
        (status.as_u16(), &body["headers"]),
        (200, &json!({"X-Source": "prj_1"}))
    );

    // Deliveries, recover, retry, test.
    let (status, _) = op.ingest(ORG, "database.created", json!({"name": "orders"})).await;
    assert!(status.is_success(), "{status}");
    let deliveries = op.url(ORG, &format!("/{id}/deliveries"));
    let newest = |state: &'static str| {
        let (op, deliveries) = (&op, &deliveries);
        support::wait_for(state, Duration::from_secs(30), move || async move {
            let (status, body, _) = op.call("GET", deliveries, pk, None).await;
            assert_eq!(status, 200, "{body}");
            assert_conforms("DeliveryList", &body);
            let first = body["deliveries"][0].clone();
            (first["state"] == state).then_some(first)
        })
    };
    let failed = newest("failed").await;
    let since = (jiff::Timestamp::now() - jiff::SignedDuration::from_secs(600)).to_string();
    let (status, body, _) = op
        .call(
            "POST",
            &op.url(ORG, &format!("/{id}/recover")),
            pk,
            Some(json!({"since": since})),
        )
        .await;
    assert_eq!((status.as_u16(), &body), (202, &json!({"recovered": 1})));
    newest("succeeded").await;
    let retry = op.url(
        ORG,
        &format!("/{id}/deliveries/{}/retry", failed["id"].as_str().unwrap()),
    );
    let (status, body, _) = op.call("POST", &retry, pk, None).await;
    assert_eq!(status, 202, "{body}");
    assert_conforms("DeliveryResponse", &body);
    let (status, body, _) = op.call("POST", &op.url(ORG, &format!("/{id}/test")), pk, None).await;
    assert_eq!(status, 202, "{body}");
    // Sent: the first attempt, the recovered one, the retry and the test event.
    support::wait_for("retry and test received", Duration::from_secs(30), || async {
        let got = receiver.received();
        (got.len() == 4 && got.iter().any(|r| r.json()["type"] == "webhook.test")).then_some(())
    })
    .await;

    // A portal session, for the organization.
    let sessions = |org: &str| format!("{}/{org}/portal-sessions", op.base);
    let (status, session, _) = op.call("POST", &sessions(ORG), pk, None).await;
    assert_eq!(status, 201, "{session}");
    assert_conforms("PortalSession", &session);
    let (status, _, _) = op.call("GET", &op.url(ORG, ""), session["token"].as_str(), None).await;
    assert_eq!(status, 200);

    // Another organization: 403 on every route, with the other organization's own endpoint id,
    // both ways (this organization's project key there, theirs here).
    let other_id = op
        .create_endpoint(OTHER_ORG, &other_key, "https://hooks.example.com/theirs")
        .await;
    let since = (jiff::Timestamp::now() - jiff::SignedDuration::from_secs(600)).to_string();
    for (key, org, target) in [(&project_key, OTHER_ORG, &other_id), (&other_project_key, ORG, &id)] {
        let url = |rest: &str| op.url(org, rest);
        let routes: Vec<(&str, String, Option<Value>)> = vec![
            ("GET", url(""), None),
            ("POST", url(""), Some(json!({"url": "https://hooks.example.com/x"}))),
            (
                "PATCH",
                url(&format!("/{target}")),
                Some(json!({"description": "taken"})),
            ),
            ("POST", url(&format!("/{target}/rotate-secret")), None),
            ("GET", url(&format!("/{target}/deliveries")), None),
            ("GET", url(&format!("/{target}/settings")), None),
            (
                "PATCH",
                url(&format!("/{target}/settings")),
                Some(json!({"rate_limit": 1})),
            ),
            ("POST", url(&format!("/{target}/test")), None),
            (
                "POST",
                url(&format!("/{target}/recover")),
                Some(json!({"since": since})),
            ),
            ("POST", url(&format!("/{target}/deliveries/msg_any/retry")), None),
            ("POST", sessions(org), None),
            ("DELETE", url(&format!("/{target}")), None),
        ];
        for (method, url, body) in routes {
            let (status, body, _) = op.call(method, &url, Some(key), body).await;
            assert_eq!(status, 403, "{method} {url}: {body}");
            assert_conforms("Error", &body);
            let message = body["error"].as_str().unwrap();
            assert!(message.contains("organization"), "{message}");
            assert!(!message.contains(key.as_str()), "the error echoes the key");
        }
    }
    let (_, theirs, _) = op.call("GET", &op.url(OTHER_ORG, ""), Some(&other_key), None).await;
    assert_eq!(ids(&theirs), vec![other_id]);
    assert_eq!(theirs["webhook_endpoints"][0]["description"], "");

    // Delete, last: the organization key's endpoint and its own.
    for target in [&org_id, &id] {
        let (status, body, _) = op.call("DELETE", &op.url(ORG, &format!("/{target}")), pk, None).await;
        assert_eq!((status.as_u16(), &body), (200, &json!({"deleted": true})));
    }
    let (_, listed, _) = op.call("GET", &op.url(ORG, ""), Some(&org_key), None).await;
    assert_eq!(listed, json!({"webhook_endpoints": []}));
}

#[tokio::test]
async fn bad_requests_get_clear_json_errors() {
    let (client, ns, op, _) = setup("hardening", true).await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    let url = op.url(ORG, "");
    let send = |req: reqwest::RequestBuilder| async {
        let res = req
            .header("authorization", format!("Bearer {key}"))
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        assert_eq!(res.headers()["content-type"], "application/json");
        let body: Value = res.json().await.unwrap();
        assert_conforms("Error", &body);
        (status, body["error"].as_str().unwrap().to_string())
    };
    let json_req = |body: &str| {
        op.http
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
    };

    let (s, m) = send(json_req("{not json")).await;
    assert_eq!(s, 400);
    assert!(m.contains("not valid JSON"), "{m}");
    let (s, m) = send(json_req(r#"{"url": "https://x.example", "colour": "red"}"#)).await;
    assert_eq!(s, 400);
    assert!(m.contains("unknown field `colour`"), "{m}");
    let (s, m) = send(json_req(r#"{"url": 42}"#)).await;
    assert_eq!(s, 400);
    assert!(m.contains("invalid type"), "{m}");
    let (s, m) = send(json_req(r#"{"url": "ftp://x.example"}"#)).await;
    assert_eq!(s, 400);
    assert!(m.contains("scheme"), "{m}");
    let (s, m) = send(json_req(r#"{"url": "https://x.example", "event_types": ["bad type"]}"#)).await;
    assert_eq!(s, 400);
    assert!(m.contains("event type"), "{m}");
    let huge = format!(
        r#"{{"url": "https://x.example", "description": "{}"}}"#,
        "a".repeat(20_000)
    );
    let (s, _) = send(json_req(&huge)).await;
    assert_eq!(s, 413);
    let (s, _) = send(op.http.post(&url).header("content-type", "text/plain").body("{}")).await;
    assert_eq!(s, 415);
    let res = op.http.put(&url).bearer_auth(&key).send().await.unwrap();
    assert_eq!(res.status(), 405);
    assert_eq!(res.headers()["allow"], "GET, POST", "a 405 says what the route takes");
    let (s, _) = send(op.http.get(format!("{url}/x/y/z"))).await;
    assert_eq!(s, 404);
    let (s, _) = send(op.http.get(format!("{}/nothing-here", op.base))).await;
    assert_eq!(s, 404);

    // None of that created anything.
    let (_, listed, _) = op.call("GET", &url, Some(&key), None).await;
    assert_eq!(listed, json!({"webhook_endpoints": []}));
    let api: Api<WebhookEndpoint> = Api::namespaced(client, &ns);
    assert!(api.list(&Default::default()).await.unwrap().items.is_empty());
}

#[tokio::test]
async fn kubectl_and_rest_see_the_same_endpoints() {
    let (client, ns, op, _) = setup("interop", true).await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    let manifest = format!(
        "apiVersion: webhooks.capydb.io/v1\nkind: WebhookEndpoint\nmetadata:\n  name: from-kubectl\n  namespace: {ns}\n\
         spec:\n  organizationId: {ORG}\n  url: https://hooks.example.com/k\n"
    );
    let path = std::env::temp_dir().join(format!("{ns}-ep.yaml"));
    std::fs::write(&path, manifest).unwrap();
    let out = support::kubectl(&["apply", "-f", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let listed = support::wait_for("kubectl endpoint listed over REST", Duration::from_secs(20), || async {
        let (_, listed, _) = op.call("GET", &op.url(ORG, ""), Some(&key), None).await;
        (listed["webhook_endpoints"].as_array().unwrap().len() == 1).then_some(listed)
    })
    .await;
    assert_eq!(listed["webhook_endpoints"][0]["id"], "from-kubectl");
    assert_eq!(listed["webhook_endpoints"][0]["url"], "https://hooks.example.com/k");

    let (status, created, _) = op
        .call(
            "POST",
            &op.url(ORG, ""),
            Some(&key),
            Some(json!({"url": "https://hooks.example.com/r"})),
        )
        .await;
    assert_eq!(status, 201);
    let id = created["webhook_endpoint"]["id"].as_str().unwrap();
    let out = support::kubectl(&[
        "get",
        "webhookendpoints",
        "-n",
        &ns,
        "-l",
        &format!("{ORGANIZATION_LABEL}={ORG}"),
        "-o",
        "name",
    ]);
    let names = String::from_utf8_lossy(&out.stdout);
    assert!(
        names.contains(&format!("webhookendpoint.webhooks.capydb.io/{id}")),
        "{names}"
    );
    assert!(
        names.contains("from-kubectl"),
        "the controller labelled the kubectl-made endpoint: {names}"
    );
    let out = support::kubectl(&["get", "webhookendpoints", "-n", &ns]);
    let table = String::from_utf8_lossy(&out.stdout);
    for column in ["URL", "ACTIVE", "HEALTH", "AGE"] {
        assert!(table.contains(column), "{table}");
    }
}

#[tokio::test]
async fn racing_updates_lose_nothing() {
    let (client, ns, op, _) = setup("race", true).await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    let (_, created, _) = op
        .call(
            "POST",
            &op.url(ORG, ""),
            Some(&key),
            Some(json!({"url": "https://hooks.example.com/0"})),
        )
        .await;
    let id = created["webhook_endpoint"]["id"].as_str().unwrap().to_string();
    let op = Arc::new(op);
    for round in 0..5 {
        let patches = [
            json!({"url": format!("https://hooks.example.com/{round}")}),
            json!({"description": format!("round {round}")}),
            json!({"event_types": [format!("round{round}.*")]}),
            json!({"is_active": round % 2 == 0}),
        ];
        let tasks: Vec<_> = patches
            .into_iter()
            .map(|p| {
                let (op, key, url) = (op.clone(), key.clone(), op.url(ORG, &format!("/{id}")));
                tokio::spawn(async move { op.call("PATCH", &url, Some(&key), Some(p)).await.0 })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 200);
        }
        let ep = Api::<WebhookEndpoint>::namespaced(client.clone(), &ns)
            .get(&id)
            .await
            .unwrap();
        assert_eq!(ep.spec.url, format!("https://hooks.example.com/{round}"));
        assert_eq!(ep.spec.description, format!("round {round}"));
        assert_eq!(ep.spec.event_types, vec![format!("round{round}.*")]);
        assert_eq!(ep.spec.active, round % 2 == 0);
        assert_eq!(ep.labels()[ORGANIZATION_LABEL], ORG);
    }
    // Concurrent rotations each complete: two requests, two rotations (each answers with its own
    // secret or a newer one).
    let rotate =
        |op: Arc<Operator>, key: String, url: String| async move { op.call("POST", &url, Some(&key), None).await };
    let url = op.url(ORG, &format!("/{id}/rotate-secret"));
    let (a, b) = tokio::join!(
        rotate(op.clone(), key.clone(), url.clone()),
        rotate(op.clone(), key.clone(), url)
    );
    assert_eq!((a.0, b.0), (StatusCode::OK, StatusCode::OK));
    let ep = Api::<WebhookEndpoint>::namespaced(client.clone(), &ns)
        .get(&id)
        .await
        .unwrap();
    assert_eq!(ep.spec.secret_rotation, 2);
}

#[tokio::test]
async fn create_without_a_controller_answers_503_and_leaves_nothing() {
    let (client, ns, op, _) = setup("nocontroller", false).await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    let (status, body, headers) = op
        .call(
            "POST",
            &op.url(ORG, ""),
            Some(&key),
            Some(json!({"url": "https://hooks.example.com/a"})),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(headers.contains_key("retry-after"));
    assert!(body["error"].as_str().unwrap().contains("nothing was created"));
    let api: Api<WebhookEndpoint> = Api::namespaced(client, &ns);
    support::wait_for("undone create is gone", Duration::from_secs(10), || async {
        api.list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
            .then_some(())
    })
    .await;
}
