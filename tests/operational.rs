//! Operational webhooks (issue 24, item 4) on a real control plane, with the real binary: two
//! replicas and the platform's receiver, which verifies every signature with the configured
//! `whsec_` secret. Each endpoint change made over REST, and each exhausted delivery, is told to
//! the platform exactly once, retried when the platform's receiver fails at first, also across a
//! replica killed and restarted in the middle.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use capy_webhooks::signing::SigningSecret;
use serde_json::{Value, json};
use support::operator::INGEST_TOKEN;
use support::process::{OperatorProcess, create_endpoint};
use support::receiver::{Answer, Received, Receiver};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One scenario at a time: each runs two operator processes.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One operator process with operational webhooks on.
struct Replica {
    api: u16,
    ingest: u16,
    ops: u16,
    name: String,
    process: Option<OperatorProcess>,
    /// Further flags, as `--flag value` pairs.
    extra: Vec<(String, String)>,
}

impl Replica {
    fn start(
        ns: &str,
        dir: &Path,
        name: &str,
        operational_url: &str,
        secret_file: &Path,
        extra: &[(&str, &str)],
    ) -> Self {
        let (api, ingest, ops) = (free_port(), free_port(), free_port());
        let mut replica = Self {
            api,
            ingest,
            ops,
            name: name.to_string(),
            process: None,
            extra: extra.iter().map(|(f, v)| (f.to_string(), v.to_string())).collect(),
        };
        replica.restart(ns, dir, operational_url, secret_file);
        replica
    }

    /// Starts the process (again) on the same ports and identity.
    fn restart(&mut self, ns: &str, dir: &Path, operational_url: &str, secret_file: &Path) {
        let (api, ingest, ops, name) = (self.api, self.ingest, self.ops, self.name.clone());
        let mut flags = vec![
            ("--api-listen", format!("127.0.0.1:{api}")),
            ("--ingest-listen", format!("127.0.0.1:{ingest}")),
            ("--metrics-listen", format!("127.0.0.1:{ops}")),
            ("--identity", name.to_string()),
            ("--lease-duration", "6s".into()),
            // Four attempts, quickly: a customer's delivery exhausts in about a second.
            ("--retry-schedule", "0s,300ms,300ms,300ms".into()),
            ("--log-write-budget", "0".into()),
            ("--controller-wait", "30s".into()),
            ("--operational-webhook-url", operational_url.to_string()),
            ("--operational-webhook-secret-file", secret_file.display().to_string()),
        ];
        flags.extend(self.extra.iter().map(|(f, v)| (f.as_str(), v.clone())));
        self.process = Some(OperatorProcess::start_replica(ns, dir, &name, flags));
    }

    /// `kill -9`.
    fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }
}

/// A namespace, the platform's secret in a file, the platform's receiver (failing its first
/// request) and two replicas sending to it.
struct Scenario {
    client: kube::Client,
    ns: String,
    dir: tempfile::TempDir,
    secret: SigningSecret,
    secret_file: std::path::PathBuf,
    platform: Receiver,
    replicas: Vec<Replica>,
    http: reqwest::Client,
}

impl Scenario {
    async fn start(prefix: &str) -> Self {
        Self::start_with(prefix, &[]).await
    }

    /// [`Self::start`], with further flags for both replicas.
    async fn start_with(prefix: &str, extra: &[(&str, &str)]) -> Self {
        let client = support::client().await;
        support::install_crd(&client).await;
        let ns = support::test_namespace(&client, prefix).await;
        let mut dir = tempfile::Builder::new().prefix("capy-operational-").tempdir().unwrap();
        // Removed only when the scenario passes.
        dir.disable_cleanup(true);
        println!("replica logs in {}", dir.path().display());
        let secret = SigningSecret::generate();
        let secret_file = dir.path().join("operational-secret");
        std::fs::write(&secret_file, format!("{}\n", secret.expose())).unwrap();
        // The platform fails the first request it gets; everything after is accepted.
        let platform = Receiver::start(vec![Answer::Status(503)]).await;
        let url = platform.url("/operational");
        let replicas = ["opwh-a", "opwh-b"]
            .iter()
            .map(|name| Replica::start(&ns, dir.path(), name, &url, &secret_file, extra))
            .collect();
        Self {
            client,
            ns,
            dir,
            secret,
            secret_file,
            platform,
            replicas,
            http: reqwest::Client::new(),
        }
    }

    /// An API key of `org`, and an endpoint of it created over REST (replica a) for `customers`.
    async fn endpoint(&self, org: &str, customers: &Receiver) -> (String, String) {
        let (_, key) = capy_webhooks::auth::api_keys::create_key(&self.client, &self.ns, org, None, None)
            .await
            .unwrap();
        let id = create_endpoint(&self.http, self.replicas[0].api, org, &key, &customers.url("/c")).await;
        (key, id)
    }

    /// `kill -9` of one replica, and the same replica started again.
    fn kill_and_restart(&mut self, i: usize) {
        let url = self.platform.url("/operational");
        self.replicas[i].kill();
        self.replicas[i].restart(&self.ns, self.dir.path(), &url, &self.secret_file);
    }

    /// The requests the platform received of these types.
    fn told(&self, types: &[&str]) -> Vec<Received> {
        self.platform
            .received()
            .into_iter()
            .filter(|r| types.iter().any(|t| r.json()["type"] == *t))
            .collect()
    }

    async fn finish(mut self) {
        for replica in &mut self.replicas {
            replica.kill();
        }
        support::delete_namespace(&self.client, &self.ns).await;
        self.dir.disable_cleanup(false);
    }
}

/// Checks one request at the platform's receiver as a platform would: the Standard Webhooks
/// headers' shape, then the signature with the configured secret (the `standardwebhooks` crate).
fn verified(secret: &str, request: &Received) -> Value {
    let id = request.header("webhook-id");
    assert!(id.starts_with("msg_") && id.len() == 30, "webhook-id {id:?}");
    let timestamp: i64 = request
        .header("webhook-timestamp")
        .parse()
        .expect("a numeric timestamp");
    assert!((timestamp - jiff::Timestamp::now().as_second()).abs() < 300);
    let signature = request.header("webhook-signature");
    assert!(signature.starts_with("v1,"), "signature {signature:?}");
    let wh = standardwebhooks::Webhook::new(secret).unwrap();
    wh.verify(&request.body, &request.headers)
        .expect("the platform's receiver verifies the signature");
    // A wrong secret does not verify: the check above means something.
    let other = standardwebhooks::Webhook::new(SigningSecret::generate().expose()).unwrap();
    assert!(other.verify(&request.body, &request.headers).is_err());
    request.json()
}

/// Posts one event to an ingest port until it is accepted (202) and makes one delivery.
async fn produce(http: &reqwest::Client, ingest: u16, org: &str) -> String {
    let accepted = accept_event(http, ingest, org).await;
    assert_eq!(accepted["deliveries"], 1, "{accepted}");
    accepted["id"].as_str().unwrap().to_string()
}

/// Posts one event to an ingest port until it is accepted (202); the answer.
async fn accept_event(http: &reqwest::Client, ingest: u16, org: &str) -> Value {
    let url = format!("http://127.0.0.1:{ingest}/v1/organizations/{org}/events");
    let accepted: Value = support::wait_for("event accepted", Duration::from_secs(60), || async {
        let r = http
            .post(&url)
            .bearer_auth(INGEST_TOKEN)
            .json(&json!({"type": "database.created", "data": {"database": "db_1", "secret_field": "s3cr3t"}}))
            .send()
            .await
            .ok()?;
        (r.status() == 202).then_some(())?;
        r.json().await.ok()
    })
    .await;
    accepted
}

/// Two replicas, four organizations with one always-failing endpoint each, an event to each
/// through either replica: the platform gets one `delivery.exhausted` per delivery (one
/// `webhook-id` each, body as documented), signed with its secret, the first retried after the
/// platform's receiver failed it.
#[tokio::test]
async fn each_exhausted_delivery_is_told_once_signed_and_retried() {
    let _one = ONE_AT_A_TIME.lock().await;
    let scenario = Scenario::start("opwh-exh").await;
    let (client, http, replicas, platform) = (&scenario.client, &scenario.http, &scenario.replicas, &scenario.platform);
    let customers = Receiver::start(vec![Answer::Status(500); 1000]).await;

    let orgs: Vec<String> = (0..4).map(|i| format!("org_opwh_{i}")).collect();
    let mut endpoints = BTreeMap::new();
    let mut events = BTreeMap::new();
    for (i, org) in orgs.iter().enumerate() {
        let (_, key) = capy_webhooks::auth::api_keys::create_key(client, &scenario.ns, org, None, None)
            .await
            .unwrap();
        let id = create_endpoint(http, replicas[i % 2].api, org, &key, &customers.url(&format!("/{org}"))).await;
        endpoints.insert(org.clone(), id);
        let event = produce(http, replicas[(i + 1) % 2].ingest, org).await;
        events.insert(org.clone(), event);
    }

    // Every customer delivery makes its four attempts, then the platform hears of it.
    const EXHAUSTED: &[&str] = &["delivery.exhausted"];
    support::wait_for(
        "every exhausted delivery told and accepted",
        Duration::from_secs(90),
        || async {
            let told = scenario.told(EXHAUSTED);
            let ids: BTreeSet<String> = told.iter().map(|r| r.header("webhook-id").to_string()).collect();
            (ids.len() == orgs.len()).then_some(())
        },
    )
    .await;
    // Time for a duplicate to show, were there one (another replica, a retried hand-off).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let told = scenario.told(EXHAUSTED);
    let created = scenario.told(&["endpoint.created"]);
    let all = platform.received();
    assert_eq!(all.len(), told.len() + created.len(), "nothing else was sent");
    let distinct: BTreeSet<&str> = all.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(
        distinct.len(),
        2 * orgs.len(),
        "one delivery per exhausted delivery and per endpoint created"
    );
    assert_eq!(
        all.len(),
        distinct.len() + 1,
        "and one retry: of the request the platform failed"
    );

    let mut by_id: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for request in &told {
        by_id
            .entry(request.header("webhook-id").to_string())
            .or_default()
            .push(verified(scenario.secret.expose(), request));
    }
    let retried: Vec<_> = by_id.values().filter(|bodies| bodies.len() == 2).collect();
    assert!(retried.len() <= 1, "at most the request the platform failed came again");
    for bodies in &retried {
        assert_eq!(bodies[0], bodies[1], "a retry is the same delivery");
    }

    let mut told_orgs = BTreeSet::new();
    for bodies in by_id.values() {
        let body = &bodies[0];
        assert_eq!(body["type"], "delivery.exhausted");
        assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
        let data = &body["data"];
        let org = data["organization_id"].as_str().unwrap().to_string();
        assert_eq!(data["endpoint_id"], endpoints[&org].as_str(), "{data}");
        assert_eq!(data["event_id"], events[&org].as_str(), "{data}");
        assert_eq!(data["event_type"], "database.created");
        assert!(data["delivery_id"].as_str().unwrap().starts_with("msg_"));
        assert_eq!(data["attempts"], 4);
        assert_eq!(data["last_error_class"], "http_error");
        assert_eq!(data["last_status"], 500);
        // Never the payload or the receiver's URL.
        let text = body.to_string();
        assert!(!text.contains("s3cr3t") && !text.contains("127.0.0.1"), "{text}");
        told_orgs.insert(org);
    }
    assert_eq!(told_orgs, orgs.iter().cloned().collect());
    // The customers' receiver got exactly its four attempts per delivery.
    assert_eq!(customers.received().len(), orgs.len() * 4);
    scenario.finish().await;
}

/// An endpoint created, updated, paused, resumed and deleted over REST, with a replica killed and
/// restarted in the middle: the platform gets exactly one event of each type, in order, each
/// verified with its secret; the pause says it was a user's.
#[tokio::test]
async fn each_endpoint_change_is_told_once_in_order() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut scenario = Scenario::start("opwh-ep").await;
    let org = "org_opwh_lifecycle";
    let customers = Receiver::start(Vec::new()).await;
    let (key, id) = scenario.endpoint(org, &customers).await;
    const TYPES: &[&str] = &[
        "endpoint.created",
        "endpoint.updated",
        "endpoint.disabled",
        "endpoint.enabled",
        "endpoint.deleted",
    ];
    // Waits until the platform accepted `n` distinct endpoint events.
    async fn told_n(scenario: &Scenario, n: usize) {
        support::wait_for(
            &format!("{n} endpoint events told"),
            Duration::from_secs(60),
            || async {
                let ids: BTreeSet<String> = scenario
                    .told(TYPES)
                    .iter()
                    .map(|r| r.header("webhook-id").to_string())
                    .collect();
                (ids.len() >= n).then_some(())
            },
        )
        .await;
    }
    // Changes go through replica b (replica a is the one restarted).
    let url = format!(
        "http://127.0.0.1:{}/v1/organizations/{org}/webhook-endpoints/{id}",
        scenario.replicas[1].api
    );
    let http = scenario.http.clone();
    let patch = |body: Value| {
        let (http, key, url) = (http.clone(), key.clone(), url.clone());
        async move {
            let r = http.patch(&url).bearer_auth(&key).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        }
    };
    told_n(&scenario, 1).await;
    patch(json!({"description": "the platform hears of this"})).await;
    told_n(&scenario, 2).await;

    // A replica dies and comes back in the middle (whichever led, the other takes over or it
    // leads again): nothing is told twice, nothing is lost.
    scenario.kill_and_restart(0);
    patch(json!({"is_active": false})).await;
    told_n(&scenario, 3).await;
    patch(json!({"is_active": true})).await;
    told_n(&scenario, 4).await;
    let r = scenario.http.delete(&url).bearer_auth(&key).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    told_n(&scenario, 5).await;
    // Time for a duplicate to show, were there one.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let told = scenario.told(TYPES);
    let mut order: Vec<String> = Vec::new();
    let mut bodies: BTreeMap<String, Value> = BTreeMap::new();
    for request in &told {
        let webhook_id = request.header("webhook-id").to_string();
        let body = verified(scenario.secret.expose(), request);
        if let Some(first) = bodies.get(&webhook_id) {
            assert_eq!(first, &body, "a retry is the same delivery");
            continue;
        }
        order.push(body["type"].as_str().unwrap().to_string());
        bodies.insert(webhook_id, body);
    }
    assert_eq!(order, TYPES, "one of each, in order");
    assert_eq!(
        told.len(),
        TYPES.len() + 1,
        "the one the platform failed came again, once"
    );
    for body in bodies.values() {
        assert_eq!(body["data"]["organization_id"], org);
        assert_eq!(body["data"]["endpoint_id"], id.as_str());
        let text = body.to_string();
        assert!(!text.contains("127.0.0.1") && !text.contains("whsec_"), "{text}");
        if body["type"] == "endpoint.disabled" {
            assert_eq!(body["data"]["reason"], "manual", "{body}");
        }
    }
    scenario.finish().await;
}

/// The same change told twice (a new leader, a restart before the status recorded it) is
/// delivered once: its delivery id is derived from the change, and the operational log, read back
/// after a restart, holds it already. Another change is delivered.
#[tokio::test]
async fn the_same_change_told_again_is_delivered_once_even_after_a_restart() {
    use capy_webhooks::operational::{
        OperationalEvent, OperationalEventType, OperationalTarget, Subject, endpoint_event_body,
    };
    use support::operator::{Operator, Options};
    let _one = ONE_AT_A_TIME.lock().await;
    let platform = Receiver::start(Vec::new()).await;
    let secret = SigningSecret::generate();
    let options = || Options {
        operational: Some(OperationalTarget {
            url: platform.url("/operational"),
            secret: secret.clone(),
        }),
        ..Options::dispatching()
    };
    let (client, ns, op) = support::operator::in_new_namespace("opwh-replay", options()).await;
    let change = |generation| {
        let body = endpoint_event_body(
            OperationalEventType::EndpointUpdated,
            jiff::Timestamp::now(),
            "org_replay",
            "ep_replay",
            None,
        );
        OperationalEvent::new(
            OperationalEventType::EndpointUpdated,
            Subject::Endpoint {
                uid: "uid-replay",
                generation,
            },
            body,
        )
    };
    let first = change(2);
    op.work().unwrap().operational(first.clone()).await.unwrap();
    support::wait_for("the change delivered", Duration::from_secs(30), || async {
        (!platform.received().is_empty()).then_some(())
    })
    .await;
    op.work().unwrap().operational(change(2)).await.unwrap();
    op.stop().await;

    let op = Operator::start(&client, &ns, options()).await;
    op.work().unwrap().operational(change(2)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let received = platform.received();
    assert_eq!(received.len(), 1, "told three times, delivered once");
    assert_eq!(received[0].header("webhook-id"), first.delivery_id);
    assert_eq!(verified(secret.expose(), &received[0]), first.body);

    op.work().unwrap().operational(change(3)).await.unwrap();
    support::wait_for("the next change delivered", Duration::from_secs(30), || async {
        (platform.received().len() == 2).then_some(())
    })
    .await;
    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}

/// An endpoint the health rule disables says so, with the rule's text; resumed and then paused by
/// a user, it says `manual` (the dispatcher's annotation from the earlier disable is not taken for
/// this one).
#[tokio::test]
async fn a_disable_says_whether_the_health_rule_or_a_user_did_it() {
    let _one = ONE_AT_A_TIME.lock().await;
    let scenario = Scenario::start_with("opwh-auto", &[("--auto-disable-after", "1s")]).await;
    let org = "org_opwh_auto";
    let customers = Receiver::start(vec![Answer::Status(500); 1000]).await;
    let (key, id) = scenario.endpoint(org, &customers).await;
    // Failures spanning more than a second: the second event's first failure disables it. On a
    // slow machine the first event's own four attempts may already span a second and disable it
    // before the second event arrives, which then matches no active endpoint; either way one
    // disable by the health rule must be told.
    produce(&scenario.http, scenario.replicas[1].ingest, org).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = accept_event(&scenario.http, scenario.replicas[0].ingest, org).await;
    assert!(second["deliveries"] == 1 || second["deliveries"] == 0, "{second}");

    let disabled = |n: usize| {
        let scenario = &scenario;
        async move {
            support::wait_for(
                &format!("{n} endpoint.disabled told"),
                Duration::from_secs(60),
                || async {
                    let told = scenario.told(&["endpoint.disabled"]);
                    let mut bodies: BTreeMap<String, Value> = BTreeMap::new();
                    for r in &told {
                        bodies.insert(
                            r.header("webhook-id").to_string(),
                            verified(scenario.secret.expose(), r),
                        );
                    }
                    (bodies.len() >= n).then(|| {
                        let mut bodies: Vec<Value> = bodies.into_values().collect();
                        bodies.sort_by_key(|b| b["timestamp"].as_str().unwrap().to_string());
                        bodies
                    })
                },
            )
            .await
        }
    };
    let auto = disabled(1).await;
    assert_eq!(auto[0]["data"]["endpoint_id"], id.as_str());
    assert_eq!(auto[0]["data"]["reason"], "auto_disabled", "{}", auto[0]);
    let detail = auto[0]["data"]["reason_detail"].as_str().unwrap();
    assert!(detail.starts_with("every delivery attempt failed since"), "{detail}");

    let url = format!(
        "http://127.0.0.1:{}/v1/organizations/{org}/webhook-endpoints/{id}",
        scenario.replicas[1].api
    );
    for active in [true, false] {
        let r = scenario
            .http
            .patch(&url)
            .bearer_auth(&key)
            .json(&json!({"is_active": active}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        if active {
            support::wait_for("endpoint.enabled told", Duration::from_secs(60), || async {
                (!scenario.told(&["endpoint.enabled"]).is_empty()).then_some(())
            })
            .await;
        }
    }
    let both = disabled(2).await;
    assert_eq!(both[1]["data"]["reason"], "manual", "{}", both[1]);
    assert_eq!(both[1]["data"]["reason_detail"], Value::Null);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ids = |t: &str| -> BTreeSet<String> {
        scenario
            .told(&[t])
            .iter()
            .map(|r| r.header("webhook-id").to_string())
            .collect()
    };
    assert_eq!(ids("endpoint.disabled").len(), 2, "one per disable");
    assert_eq!(ids("endpoint.enabled").len(), 1);
    assert_eq!(ids("endpoint.created").len(), 1);
    scenario.finish().await;
}
