//! The controller against a real kube-apiserver, etcd and kube-controller-manager.

mod support;

use std::time::Duration;

use capy_webhooks::controller::{self, ControllerConfig};
use capy_webhooks::endpoints::EndpointCache;
use capy_webhooks::resources::{
    CONDITION_READY, ENDPOINT_LABEL, MANAGED_BY_LABEL, ORGANIZATION_LABEL, Scope, WebhookEndpoint, WebhookEndpointSpec,
};
use capy_webhooks::signing_secret::{CURRENT_SECRET_KEY, PREVIOUS_SECRETS_KEY};
use capy_webhooks::tenancy::NamespaceBinding;
use capy_webhooks::validation::UrlPolicy;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(30);

/// A controller running in this test, scoped to one namespace; stops when dropped or `stop`ped.
struct RunningController {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    metrics: capy_webhooks::telemetry::Metrics,
}

impl RunningController {
    fn start(client: &Client, namespace: &str, grace: Duration) -> Self {
        let metrics = capy_webhooks::telemetry::Metrics::new();
        let config = ControllerConfig {
            scope: Scope::Namespace(namespace.to_string()),
            rotation_grace_period: grace,
            url_policy: UrlPolicy { allow_http: false },
            metrics: metrics.clone(),
            ready: capy_webhooks::telemetry::ReadyHandle::detached(),
            operational: None,
        };
        let cache = EndpointCache::start(
            client.clone(),
            &config.scope,
            NamespaceBinding::home_only(namespace),
            true,
        );
        let feed = cache.controller_feed().expect("the cache feeds the controller");
        let (tx, rx) = oneshot::channel::<()>();
        let always_leading = tokio::sync::watch::channel(true).1;
        let task = tokio::spawn(controller::run(
            client.clone(),
            config,
            feed,
            always_leading,
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            stop: Some(tx),
            task,
            metrics,
        }
    }

    /// Reconciles finished so far (`capy_webhooks_reconciles_total`).
    fn reconciles(&self) -> u64 {
        self.metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix("capy_webhooks_reconciles_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until a reconcile finishes after `before` were counted.
    async fn wait_reconciled_after(&self, before: u64) {
        support::wait_for("a reconcile", WAIT, || async {
            (self.reconciles() > before).then_some(())
        })
        .await;
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("controller stops")
            .unwrap()
            .unwrap();
    }
}

fn endpoint(name: &str, org: &str) -> WebhookEndpoint {
    WebhookEndpoint::new(
        name,
        WebhookEndpointSpec {
            organization_id: org.into(),
            url: "https://hooks.example.com/in".into(),
            description: "test".into(),
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

async fn setup(prefix: &str) -> (Client, String) {
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, prefix).await;
    (client, ns)
}

fn is_ready(ep: &WebhookEndpoint) -> bool {
    ep.status.as_ref().is_some_and(|s| {
        s.observed_generation == ep.metadata.generation
            && s.conditions
                .iter()
                .any(|c| c.type_ == CONDITION_READY && c.status == "True")
    })
}

async fn wait_ready(api: &Api<WebhookEndpoint>, name: &str) -> WebhookEndpoint {
    support::wait_for(&format!("endpoint {name} Ready"), WAIT, || async {
        api.get_opt(name).await.unwrap().filter(is_ready)
    })
    .await
}

fn current_secret(secret: &Secret) -> String {
    String::from_utf8(secret.data.as_ref().unwrap()[CURRENT_SECRET_KEY].0.clone()).unwrap()
}

fn previous_secrets(secret: &Secret) -> Vec<serde_json::Value> {
    serde_json::from_slice(&secret.data.as_ref().unwrap()[PREVIOUS_SECRETS_KEY].0).unwrap()
}

async fn events_for(client: &Client, ns: &str, name: &str, reason: &str) -> Vec<K8sEvent> {
    let events: Api<K8sEvent> = Api::namespaced(client.clone(), ns);
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name) && e.reason.as_deref() == Some(reason)
        })
        .collect()
}

#[tokio::test]
async fn api_server_refuses_invalid_endpoints_with_clear_messages() {
    let (client, ns) = setup("crd").await;

    let out = support::kubectl(&[
        "apply",
        "-n",
        &ns,
        "-f",
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples/webhookendpoint.yaml"),
    ]);
    assert!(
        out.status.success(),
        "example applies: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let api: Api<WebhookEndpoint> = Api::namespaced(client.clone(), &ns);
    let refused = |obj: serde_json::Value| {
        let api = api.clone();
        async move {
            let ep: WebhookEndpoint =
                serde_json::from_value(obj).unwrap_or_else(|_| panic!("test object deserializes"));
            match api.create(&PostParams::default(), &ep).await {
                Err(kube::Error::Api(status)) => {
                    assert_eq!(status.code, 422, "{status:?}");
                    status.message
                }
                other => panic!("expected a 422 refusal, got {other:?}"),
            }
        }
    };
    let base = |spec: serde_json::Value| json!({"apiVersion": "webhooks.capydb.io/v1", "kind": "WebhookEndpoint", "metadata": {"name": "bad"}, "spec": spec});

    let msg = refused(base(json!({"organizationId": "org_1", "url": "ftp://example.com/x"}))).await;
    assert!(msg.contains("url must be an absolute http:// or https:// URL"), "{msg}");
    let msg = refused(base(json!({"organizationId": "org_1", "url": "not a url"}))).await;
    assert!(msg.contains("url must be an absolute"), "{msg}");
    let msg = refused(base(
        json!({"organizationId": "org_1", "url": "https://x.example", "eventTypes": ["bad type"]}),
    ))
    .await;
    assert!(msg.contains("eventTypes"), "{msg}");

    // A missing organizationId cannot even be expressed by the Rust type: send raw JSON.
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &kube::api::ApiResource::erase::<WebhookEndpoint>(&()),
    );
    let obj: kube::api::DynamicObject = serde_json::from_value(base(json!({"url": "https://example.com/x"}))).unwrap();
    match raw.create(&PostParams::default(), &obj).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422);
            assert!(
                status.message.contains("spec.organizationId: Required value"),
                "{}",
                status.message
            );
        }
        other => panic!("expected 422, got {other:?}"),
    }

    // organizationId is immutable.
    let err = api
        .patch(
            "orders-receiver",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"organizationId": "org_other"}})),
        )
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(status) => assert!(
            status.message.contains("organizationId is immutable"),
            "{}",
            status.message
        ),
        other => panic!("expected an API refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn create_makes_an_owned_signing_secret_and_reports_ready() {
    let (client, ns) = setup("create").await;
    let ctl = RunningController::start(&client, &ns, Duration::from_secs(3600));
    let api: Api<WebhookEndpoint> = Api::namespaced(client.clone(), &ns);
    // Made without the organization label, as kubectl users would: the controller adds it.
    api.create(&PostParams::default(), &endpoint("ep1", "org_a"))
        .await
        .unwrap();

    let ep = wait_ready(&api, "ep1").await;
    let status = ep.status.as_ref().unwrap();
    assert_eq!(status.observed_generation, ep.metadata.generation);
    assert_eq!(status.secret_name.as_deref(), Some("ep1-signing"));
    assert_eq!(ep.labels().get(ORGANIZATION_LABEL).map(String::as_str), Some("org_a"));
    assert!(status.updated_at.is_some());

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret = secrets.get("ep1-signing").await.unwrap();
    let value = current_secret(&secret);
    assert!(value.starts_with("whsec_"));
    assert_eq!(value.len(), "whsec_".len() + 44, "32 random bytes in base64");
    let owner = &secret.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("WebhookEndpoint", "ep1", Some(true))
    );
    assert_eq!(owner.uid, ep.uid().unwrap());
    assert_eq!(
        secret.labels().get(MANAGED_BY_LABEL).map(String::as_str),
        Some("capy-webhooks")
    );
    assert_eq!(secret.labels().get(ENDPOINT_LABEL).map(String::as_str), Some("ep1"));
    assert_eq!(events_for(&client, &ns, "ep1", "SecretCreated").await.len(), 1);

    // Nothing changed, so nothing is written again: the status stays byte for byte.
    let before = ep.resource_version();
    let reconciled = ctl.reconciles();
    api.patch(
        "ep1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"poke": "1"}}})),
    )
    .await
    .unwrap();
    // The poke is seen and reconciled; only then does "nothing written" mean something.
    ctl.wait_reconciled_after(reconciled).await;
    let after = api.get("ep1").await.unwrap();
    assert_eq!(after.status, ep.status, "status not rewritten without a change");
    assert_ne!(after.resource_version(), before);
    ctl.stop().await;
}

/// A Secret of the signing Secret's name made beforehand by someone else is neither read nor
/// changed: whoever made it would know the signing key.
#[tokio::test]
async fn a_secret_made_in_advance_is_never_adopted() {
    let (client, ns) = setup("taken").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let planted: Secret = serde_json::from_value(json!({
        "metadata": {"name": "ep1-signing"},
        "stringData": {CURRENT_SECRET_KEY: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", PREVIOUS_SECRETS_KEY: "[]"},
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &planted).await.unwrap();
    let planted = secrets.get("ep1-signing").await.unwrap();

    let ctl = RunningController::start(&client, &ns, Duration::from_secs(3600));
    let api: Api<WebhookEndpoint> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &endpoint("ep1", "org_a"))
        .await
        .unwrap();
    let refused = support::wait_for("SecretNameTaken", WAIT, || async {
        let ep = api.get("ep1").await.unwrap();
        let status = ep.status.clone()?;
        let reason = |t: &str| {
            status
                .conditions
                .iter()
                .find(|c| c.type_ == t)
                .map(|c| (c.status.clone(), c.reason.clone()))
        };
        (reason(CONDITION_READY) == Some(("False".into(), "SecretNameTaken".into()))).then_some(status)
    })
    .await;
    let secret_ready = refused.conditions.iter().find(|c| c.type_ == "SecretReady").unwrap();
    assert_eq!(
        (secret_ready.status.as_str(), secret_ready.reason.as_str()),
        ("False", "SecretNameTaken")
    );
    assert!(secret_ready.message.contains("ep1-signing"), "{}", secret_ready.message);
    assert_eq!(refused.secret_name, None, "no secret is reported as the endpoint's");
    let after = secrets.get("ep1-signing").await.unwrap();
    assert_eq!(
        after.resource_version(),
        planted.resource_version(),
        "the planted Secret is untouched"
    );
    assert!(after.owner_references().is_empty());
    assert_eq!(events_for(&client, &ns, "ep1", "SecretNameTaken").await.len(), 1);

    // Once the planted Secret is gone, the next reconcile makes a fresh secret of our own.
    secrets.delete("ep1-signing", &DeleteParams::default()).await.unwrap();
    api.patch(
        "ep1",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"description": "look again"}})),
    )
    .await
    .unwrap();
    let ep = wait_ready(&api, "ep1").await;
    let secret = secrets.get("ep1-signing").await.unwrap();
    assert_eq!(secret.owner_references()[0].uid, ep.uid().unwrap());
    assert_ne!(current_secret(&secret), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    ctl.stop().await;
}

#[tokio::test]
async fn rotation_keeps_the_previous_secret_until_it_expires() {
    let (client, ns) = setup("rotate").await;
    let grace = Duration::from_secs(4);
    let ctl = RunningController::start(&client, &ns, grace);
    let api: Api<WebhookEndpoint> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &endpoint("ep1", "org_a"))
        .await
        .unwrap();
    wait_ready(&api, "ep1").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let original = current_secret(&secrets.get("ep1-signing").await.unwrap());

    api.patch(
        "ep1",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"secretRotation": 1}})),
    )
    .await
    .unwrap();
    let ep = support::wait_for("rotation 1 completed", WAIT, || async {
        api.get("ep1")
            .await
            .ok()
            .filter(|ep| ep.status.as_ref().is_some_and(|s| s.secret_rotation == 1) && is_ready(ep))
    })
    .await;
    assert_eq!(ep.status.unwrap().secret_rotation, 1);
    let secret = secrets.get("ep1-signing").await.unwrap();
    let rotated = current_secret(&secret);
    assert_ne!(rotated, original);
    let previous = previous_secrets(&secret);
    assert_eq!(previous.len(), 1);
    assert_eq!(previous[0]["secret"], original);
    let expires: jiff::Timestamp = previous[0]["expiresAt"].as_str().unwrap().parse().unwrap();
    let left = jiff::Timestamp::now().duration_until(expires);
    assert!(
        left > jiff::SignedDuration::ZERO && left <= jiff::SignedDuration::from_secs(4),
        "{left:?}"
    );
    assert_eq!(events_for(&client, &ns, "ep1", "SecretRotated").await.len(), 1);

    // The controller requeues itself at the expiry and prunes the old secret.
    support::wait_for("expired secret pruned", WAIT, || async {
        let s = secrets.get("ep1-signing").await.unwrap();
        previous_secrets(&s).is_empty().then_some(())
    })
    .await;
    assert_eq!(
        current_secret(&secrets.get("ep1-signing").await.unwrap()),
        rotated,
        "pruning keeps the current secret"
    );

    // Lowering secretRotation is refused by the API server.
    let err = api
        .patch(
            "ep1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"secretRotation": 0}})),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("secretRotation can only be raised"), "{err}");
    ctl.stop().await;
}

#[tokio::test]
async fn deleted_secret_is_repaired_and_deleted_endpoint_is_collected() {
    let (client, ns) = setup("repair").await;
    let ctl = RunningController::start(&client, &ns, Duration::from_secs(3600));
    let api: Api<WebhookEndpoint> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &endpoint("ep1", "org_a"))
        .await
        .unwrap();
    wait_ready(&api, "ep1").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let first = secrets.get("ep1-signing").await.unwrap();

    secrets.delete("ep1-signing", &DeleteParams::default()).await.unwrap();
    let repaired = support::wait_for("secret recreated", WAIT, || async {
        secrets
            .get_opt("ep1-signing")
            .await
            .unwrap()
            .filter(|s| s.uid() != first.uid())
    })
    .await;
    assert_ne!(
        current_secret(&repaired),
        current_secret(&first),
        "a repaired secret is new"
    );
    let warnings = support::wait_for("SecretRepaired event", WAIT, || async {
        let evs = events_for(&client, &ns, "ep1", "SecretRepaired").await;
        (!evs.is_empty()).then_some(evs)
    })
    .await;
    assert_eq!(warnings[0].type_.as_deref(), Some("Warning"));

    // A corrupted secret is repaired too, and its bad value never shows in the Event.
    secrets
        .patch(
            "ep1-signing",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {CURRENT_SECRET_KEY: "bm90LWEtc2VjcmV0"}})),
        )
        .await
        .unwrap();
    let fixed = support::wait_for("corrupt secret repaired", WAIT, || async {
        secrets
            .get("ep1-signing")
            .await
            .ok()
            .filter(|s| current_secret(s).starts_with("whsec_"))
    })
    .await;
    assert_ne!(current_secret(&fixed), current_secret(&repaired));

    // Deleting the endpoint lets the garbage collector remove its Secret. The collector picks up
    // a newly installed CRD's kind only after its discovery resync (up to ~30 s), hence the
    // longer wait.
    api.delete("ep1", &DeleteParams::foreground()).await.unwrap();
    support::wait_for("secret garbage-collected", Duration::from_secs(90), || async {
        secrets.get_opt("ep1-signing").await.unwrap().is_none().then_some(())
    })
    .await;
    ctl.stop().await;
}

#[tokio::test]
async fn restarting_the_controller_regenerates_nothing() {
    let (client, ns) = setup("restart").await;
    let api: Api<WebhookEndpoint> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let ctl = RunningController::start(&client, &ns, Duration::from_secs(3600));
    api.create(&PostParams::default(), &endpoint("ep1", "org_a"))
        .await
        .unwrap();
    wait_ready(&api, "ep1").await;
    let before = secrets.get("ep1-signing").await.unwrap();
    ctl.stop().await;

    let ctl = RunningController::start(&client, &ns, Duration::from_secs(3600));
    // A spec change gives a positive signal that the new controller has reconciled.
    api.patch(
        "ep1",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"description": "changed"}})),
    )
    .await
    .unwrap();
    let ep = wait_ready(&api, "ep1").await;
    assert_eq!(ep.metadata.generation, Some(2));
    let after = secrets.get("ep1-signing").await.unwrap();
    assert_eq!(
        after.resource_version(),
        before.resource_version(),
        "the Secret was not written"
    );
    assert_eq!(current_secret(&after), current_secret(&before));
    assert_eq!(events_for(&client, &ns, "ep1", "SecretCreated").await.len(), 1);
    ctl.stop().await;
}

#[tokio::test]
async fn invalid_spec_waits_for_a_change() {
    let (client, ns) = setup("invalid").await;
    let ctl = RunningController::start(&client, &ns, Duration::from_secs(3600));
    let api: Api<WebhookEndpoint> = Api::namespaced(client.clone(), &ns);
    // The schema allows http://, but this operator is configured for https only.
    let mut ep = endpoint("ep1", "org_a");
    ep.spec.url = "http://hooks.example.com/in".into();
    api.create(&PostParams::default(), &ep).await.unwrap();
    let ep = support::wait_for("InvalidSpec condition", WAIT, || async {
        api.get("ep1").await.ok().filter(|ep| {
            ep.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == CONDITION_READY && c.status == "False" && c.reason == "InvalidSpec")
            })
        })
    })
    .await;
    let ready = ep
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == CONDITION_READY)
        .unwrap();
    assert!(ready.message.contains("https"), "{}", ready.message);
    assert!(
        Api::<Secret>::namespaced(client.clone(), &ns)
            .get_opt("ep1-signing")
            .await
            .unwrap()
            .is_none()
    );

    api.patch(
        "ep1",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"url": "https://hooks.example.com/in"}})),
    )
    .await
    .unwrap();
    wait_ready(&api, "ep1").await;
    ctl.stop().await;
}

/// The Ready condition of `name` once it is `False` with reason `InvalidSpec`.
async fn wait_invalid_spec(api: &Api<WebhookEndpoint>, name: &str) -> String {
    support::wait_for("InvalidSpec condition", WAIT, || async {
        api.get(name).await.ok().and_then(|ep| {
            ep.status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == CONDITION_READY && c.status == "False" && c.reason == "InvalidSpec")
                .map(|c| c.message)
        })
    })
    .await
}

/// A filter is CEL the CRD schema cannot check: written with kubectl past the REST facade, a
/// filter that does not compile makes the endpoint not Ready, with the position in the message.
#[tokio::test]
async fn a_bad_filter_written_with_kubectl_gets_a_clear_condition() {
    let (client, ns) = setup("filter").await;
    let ctl = RunningController::start(&client, &ns, Duration::from_secs(3600));
    let api: Api<WebhookEndpoint> = Api::namespaced(client.clone(), &ns);
    let manifest = |filter: &str| {
        format!(
            "apiVersion: webhooks.capydb.io/v1\nkind: WebhookEndpoint\nmetadata:\n  name: ep1\n  namespace: {ns}\n\
             spec:\n  organizationId: org_a\n  url: https://hooks.example.com/in\n  filter: {}\n",
            serde_json::to_string(filter).unwrap()
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let apply = |filter: &str| {
        let file = dir.path().join("ep.yaml");
        std::fs::write(&file, manifest(filter)).unwrap();
        support::ok(
            "kubectl apply",
            support::kubectl(&["apply", "-f", file.to_str().unwrap()]),
        );
    };

    apply("event.data.region.startsWith('eu-') &&");
    let message = wait_invalid_spec(&api, "ep1").await;
    assert!(
        message.contains("filter has a syntax error at line 1, column "),
        "{message}"
    );

    apply("event.data.size > 'big'.size() && event.kind == 'x'");
    let message = support::wait_for("the type error's condition", WAIT, || async {
        Some(wait_invalid_spec(&api, "ep1").await).filter(|m| m.contains("type error"))
    })
    .await;
    assert!(
        message.contains("line 1, column 40: event has no field 'kind'"),
        "{message}"
    );

    apply("event.data.region.startsWith('eu-')");
    let ep = wait_ready(&api, "ep1").await;
    assert_eq!(ep.spec.filter.as_deref(), Some("event.data.region.startsWith('eu-')"));
    ctl.stop().await;
}
