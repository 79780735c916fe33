//! What one organization may cost: endpoints, requests on the delivery routes, and who in it may
//! manage webhooks. Real API server, real operator components.

mod support;

use std::time::Duration;

use capy_webhooks::auth::clerk::testing::TestIssuer;
use serde_json::{Value, json};
use support::operator::{ISSUER, Operator, Options, serve_jwks};
use support::receiver::Receiver;

const ORG: &str = "org_limits";

fn session(org: &str, role: Option<&str>) -> Value {
    let now = jiff::Timestamp::now().as_second();
    let mut claims = json!({"sub": "user_1", "iss": ISSUER, "iat": now, "nbf": now - 10, "exp": now + 300, "org_id": org, "sid": "sess_1"});
    if let Some(role) = role {
        claims["org_role"] = json!(role);
    }
    claims
}

#[tokio::test]
async fn an_organization_gets_at_most_its_endpoints() {
    let (client, ns, op) = support::operator::in_new_namespace(
        "max-endpoints",
        Options {
            max_endpoints_per_organization: 2,
            ..Options::default()
        },
    )
    .await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    let create = || async {
        op.call(
            "POST",
            &op.url(ORG, ""),
            Some(&key),
            Some(json!({"url": "https://hooks.example.com/in"})),
        )
        .await
    };
    let (status, first, _) = create().await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(create().await.0, 201);
    let (status, refused, _) = create().await;
    assert_eq!(status, 409, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("most endpoints allowed (2)"),
        "{refused}"
    );
    // Another organization is not affected.
    let (_, other_key) = op.mint_key(&client, &ns, "org_other", None).await;
    let (status, _, _) = op
        .call(
            "POST",
            &op.url("org_other", ""),
            Some(&other_key),
            Some(json!({"url": "https://hooks.example.com/in"})),
        )
        .await;
    assert_eq!(status, 201);
    // Deleting one makes room again.
    let id = first["webhook_endpoint"]["id"].as_str().unwrap();
    assert_eq!(
        op.call("DELETE", &op.url(ORG, &format!("/{id}")), Some(&key), None)
            .await
            .0,
        200
    );
    support::wait_for("room for one more", Duration::from_secs(20), || async {
        (create().await.0 == 201).then_some(())
    })
    .await;
    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn the_delivery_routes_are_rate_limited_per_organization() {
    let (client, ns, op) = support::operator::in_new_namespace(
        "rate-limit",
        Options {
            dispatcher: true,
            organization_rate_limit: 0.5,
            ..Options::default()
        },
    )
    .await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    let receiver = Receiver::start(vec![]).await;
    let (status, created, _) = op
        .call(
            "POST",
            &op.url(ORG, ""),
            Some(&key),
            Some(json!({"url": receiver.url("/")})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["webhook_endpoint"]["id"].as_str().unwrap().to_string();
    // The burst (20) passes, mixing the routes; then 429 with Retry-After.
    let mut answers = Vec::new();
    for n in 0..21 {
        let (status, body, headers) = if n % 2 == 0 {
            op.call("GET", &op.url(ORG, &format!("/{id}/deliveries")), Some(&key), None)
                .await
        } else {
            op.call("POST", &op.url(ORG, &format!("/{id}/test")), Some(&key), None)
                .await
        };
        answers.push((status.as_u16(), body, headers));
    }
    let (last_status, last_body, last_headers) = answers.pop().unwrap();
    assert!(
        answers.iter().all(|(s, _, _)| *s == 200 || *s == 202),
        "{:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    assert_eq!(last_status, 429, "{last_body}");
    let retry_after: u64 = last_headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    // Other routes and other organizations are not limited.
    assert_eq!(op.call("GET", &op.url(ORG, ""), Some(&key), None).await.0, 200);
    let (_, other_key) = op.mint_key(&client, &ns, "org_other", None).await;
    let (status, _, _) = op
        .call(
            "GET",
            &op.url("org_other", &format!("/{id}/deliveries")),
            Some(&other_key),
            None,
        )
        .await;
    assert_eq!(
        status, 404,
        "another organization's request counts against its own limit, and finds nothing"
    );
    // After Retry-After, the organization is served again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (status, _, _) = op
        .call("GET", &op.url(ORG, &format!("/{id}/deliveries")), Some(&key), None)
        .await;
    assert_eq!(status, 200);
    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}

/// A recovery is not a reflector toward an endpoint's URL: each delivery it sends again counts
/// against the organization's rate like a request of its own, and a delivery recovered is not
/// recovered again within the cool-down, however often the call is repeated.
#[tokio::test]
async fn recovery_counts_each_delivery_and_never_resends_one_twice_at_once() {
    use support::receiver::Answer;
    const EVENTS: usize = 15;
    let (client, ns, op) = support::operator::in_new_namespace(
        "recover-limit",
        Options {
            organization_rate_limit: 0.1,
            // One attempt each: every delivery to the refusing receiver fails at once.
            schedule: "0s",
            ..Options::dispatching()
        },
    )
    .await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    let receiver = Receiver::start(vec![Answer::Status(503); 4 * EVENTS]).await;
    let id = op.create_endpoint(ORG, &key, &receiver.url("/")).await;
    let failed = |n: usize| {
        let op = &op;
        async move {
            op.metrics
                .encode()
                .contains(&format!("capy_webhooks_deliveries_total{{outcome=\"failed\"}} {n}"))
                .then_some(())
        }
    };
    for n in 0..EVENTS {
        let (status, body) = op.ingest(ORG, "recover.probe", json!({"n": n})).await;
        assert_eq!(status, 202, "{body}");
    }
    support::wait_for("every delivery failed", Duration::from_secs(30), || failed(EVENTS)).await;
    let recover_url = op.url(ORG, &format!("/{id}/recover"));
    let since = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1)).to_string();
    let recover = || op.call("POST", &recover_url, Some(&key), Some(json!({ "since": since })));
    let (status, body, _) = recover().await;
    assert_eq!(
        (status.as_u16(), body["recovered"].as_u64()),
        (202, Some(EVENTS as u64)),
        "{body}"
    );
    support::wait_for("every recovered delivery failed again", Duration::from_secs(30), || {
        failed(2 * EVENTS)
    })
    .await;
    // Repeated at once: nothing is sent again (before, all fifteen were, every call).
    let (status, body, _) = recover().await;
    assert_eq!((status.as_u16(), body["recovered"].as_u64()), (202, Some(0)), "{body}");
    assert_eq!(receiver.received().len(), 2 * EVENTS);

    // Fifteen new failures, recovered: 20 (burst) - 1 - 14 - 1 - 1 - 14 leaves the organization
    // eleven requests in debt, so its next delivery-route request waits.
    for n in 0..EVENTS {
        op.ingest(ORG, "recover.probe", json!({"n": n})).await;
    }
    support::wait_for("the new deliveries failed", Duration::from_secs(30), || {
        failed(3 * EVENTS)
    })
    .await;
    let (status, body, _) = recover().await;
    assert_eq!(
        (status.as_u16(), body["recovered"].as_u64()),
        (202, Some(EVENTS as u64)),
        "{body}"
    );
    let (status, body, headers) = op
        .call("GET", &op.url(ORG, &format!("/{id}/deliveries")), Some(&key), None)
        .await;
    assert_eq!(status, 429, "the recovered deliveries were charged: {body}");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 100, "eleven requests of debt at 0.1/s: {retry_after}");
    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}

/// A process without a dispatcher serves the deliveries route from a watch of the logs: the API
/// server sees no list of ConfigMaps per request.
#[tokio::test]
async fn deliveries_without_a_dispatcher_make_no_api_server_round_trip() {
    let (client, ns, full) = support::operator::in_new_namespace(
        "log-watch",
        Options {
            dispatcher: true,
            ..Options::default()
        },
    )
    .await;
    let api_only = Operator::start(
        &client,
        &ns,
        Options {
            controller: false,
            ..Options::default()
        },
    )
    .await;
    let (_, key) = full.mint_key(&client, &ns, ORG, None).await;
    let receiver = Receiver::start(vec![]).await;
    let (status, created, _) = full
        .call(
            "POST",
            &full.url(ORG, ""),
            Some(&key),
            Some(json!({"url": receiver.url("/")})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["webhook_endpoint"]["id"].as_str().unwrap().to_string();
    let (status, _) = full.ingest(ORG, "a.b", json!({"n": 1})).await;
    assert_eq!(status, 202);
    let path = format!("/{id}/deliveries");
    // The API-only process sees the delivery through its watch.
    support::wait_for("the delivery through the watch", Duration::from_secs(30), || async {
        let (status, body, _) = api_only.call("GET", &api_only.url(ORG, &path), Some(&key), None).await;
        (status == 200 && body["deliveries"].as_array().is_some_and(|d| !d.is_empty())).then_some(())
    })
    .await;
    let lists_before = configmap_lists();
    for _ in 0..30 {
        let (status, body, _) = api_only.call("GET", &api_only.url(ORG, &path), Some(&key), None).await;
        assert_eq!(status, 200, "{body}");
    }
    let lists = configmap_lists() - lists_before;
    // Other tests of this binary may start operators meanwhile (a list or two each).
    assert!(lists < 10, "{lists} lists of ConfigMaps for 30 requests");
    api_only.stop().await;
    full.stop().await;
    support::delete_namespace(&client, &ns).await;
}

/// LIST requests on ConfigMaps the API server has answered, from its own metrics.
fn configmap_lists() -> u64 {
    let out = support::kubectl(&["get", "--raw", "/metrics"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains("resource=\"configmaps\"")
                && l.contains("verb=\"LIST\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn a_required_role_refuses_other_members() {
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, "roles").await;
    let issuer = TestIssuer::new("kid-roles");
    let op = Operator::start(
        &client,
        &ns,
        Options {
            jwks_url: Some(serve_jwks(issuer.jwks_json()).await),
            clerk_required_roles: vec!["org:admin".into()],
            ..Options::default()
        },
    )
    .await;
    let admin = issuer.token(&session(ORG, Some("org:admin")));
    let member = issuer.token(&session(ORG, Some("org:member")));
    let no_role = issuer.token(&session(ORG, None));
    assert_eq!(op.call("GET", &op.url(ORG, ""), Some(&admin), None).await.0, 200);
    for token in [&member, &no_role] {
        let (status, body, _) = op.call("GET", &op.url(ORG, ""), Some(token), None).await;
        assert_eq!(status, 403, "{body}");
        assert!(body["error"].as_str().unwrap().contains("org:admin"), "{body}");
        let (status, _, _) = op
            .call(
                "POST",
                &op.url(ORG, ""),
                Some(token),
                Some(json!({"url": "https://hooks.example.com/in"})),
            )
            .await;
        assert_eq!(status, 403);
    }
    // API keys are organization credentials, not members: the role rule does not apply.
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    assert_eq!(op.call("GET", &op.url(ORG, ""), Some(&key), None).await.0, 200);
    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}
