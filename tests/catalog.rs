//! The event-type catalog end to end: WebhookEventType objects on the real API server, read by
//! the operator's watch; the REST listing; endpoints' event types checked against it; ingest
//! validating data against each type's schema, strict and lenient.

mod support;

use std::time::Duration;

use capy_webhooks::resources::{WebhookEventType, WebhookEventTypeSpec};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::assert_conforms;
use support::operator::{Operator, Options};

const ORG: &str = "org_alpha";
const OTHER_ORG: &str = "org_beta";

async fn setup(prefix: &str, opts: Options) -> (Client, String, Operator) {
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, prefix).await;
    let op = Operator::start(&client, &ns, opts).await;
    (client, ns, op)
}

fn backup_schema(minimum: i64) -> Value {
    json!({
        "type": "object",
        "required": ["database_id", "size_bytes"],
        "properties": {
            "database_id": {"type": "string"},
            "size_bytes": {"type": "integer", "minimum": minimum},
        },
    })
}

fn spec(name: &str) -> WebhookEventTypeSpec {
    WebhookEventTypeSpec {
        name: name.into(),
        description: format!("{name} happened"),
        group: None,
        schema: None,
        example: None,
        deprecated: false,
    }
}

/// Creates a WebhookEventType named after its type.
async fn create_type(client: &Client, ns: &str, spec: WebhookEventTypeSpec) {
    let api: Api<WebhookEventType> = Api::namespaced(client.clone(), ns);
    let object = WebhookEventType::new(&spec.name.replace('_', "-").to_lowercase(), spec);
    api.create(&PostParams::default(), &object).await.unwrap();
}

/// `capy_webhooks_events_outside_catalog_total` of the operator.
fn outside_catalog(op: &Operator) -> f64 {
    let text = op.metrics.encode();
    text.lines()
        .find_map(|l| l.strip_prefix("capy_webhooks_events_outside_catalog_total "))
        .unwrap_or_else(|| panic!("no events_outside_catalog in {text}"))
        .trim()
        .parse()
        .unwrap()
}

fn catalog_url(op: &Operator, org: &str) -> String {
    format!("{}/{org}/event-types", op.base)
}

/// The names the operator lists, once they are `want` (the catalog is read through a watch).
async fn listed_becomes(op: &Operator, key: &str, want: &[&str]) -> Value {
    support::wait_for(&format!("catalog lists {want:?}"), Duration::from_secs(15), || async {
        let (status, body, _) = op.call("GET", &catalog_url(op, ORG), Some(key), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let names: Vec<&str> = body["event_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        (names == want).then(|| body.clone())
    })
    .await
}

async fn seed_catalog(client: &Client, ns: &str) {
    create_type(
        client,
        ns,
        WebhookEventTypeSpec {
            group: Some("database".into()),
            schema: Some(backup_schema(0)),
            example: Some(json!({"database_id": "db_1", "size_bytes": 1024})),
            description: "A backup of a database finished".into(),
            ..spec("database.backup.completed")
        },
    )
    .await;
    create_type(client, ns, spec("database.created")).await;
    create_type(
        client,
        ns,
        WebhookEventTypeSpec {
            deprecated: true,
            ..spec("legacy.export_done")
        },
    )
    .await;
}

#[tokio::test]
async fn the_catalog_is_listed_to_any_credential_and_endpoints_must_subscribe_to_it() {
    let (client, ns, op) = setup("catalog-rest", Options::default()).await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    let (_, other_key) = op.mint_key(&client, &ns, OTHER_ORG, None).await;
    let k = Some(key.as_str());

    // An empty catalog: listed empty, and any type may be subscribed to, as before.
    let (status, empty, _) = op.call("GET", &catalog_url(&op, ORG), k, None).await;
    assert_eq!((status, &empty), (StatusCode::OK, &json!({"event_types": []})));
    assert_conforms("EventTypeList", &empty);
    let body = json!({"url": "https://hooks.example.com/a", "event_types": ["whatever.happened", "any.*"]});
    let (status, created, _) = op.call("POST", &op.url(ORG, ""), k, Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert!(created.get("warnings").is_none(), "{created}");
    let id = created["webhook_endpoint"]["id"].as_str().unwrap().to_string();

    // Types appear without a restart.
    seed_catalog(&client, &ns).await;
    let listed = listed_becomes(
        &op,
        &key,
        &["database.backup.completed", "database.created", "legacy.export_done"],
    )
    .await;
    assert_conforms("EventTypeList", &listed);
    assert_eq!(
        listed["event_types"][0],
        json!({
            "name": "database.backup.completed",
            "description": "A backup of a database finished",
            "group": "database",
            "schema": backup_schema(0),
            "example": {"database_id": "db_1", "size_bytes": 1024},
            "deprecated": false,
        })
    );
    assert_eq!(listed["event_types"][1]["group"], Value::Null);
    assert_eq!(listed["event_types"][2]["deprecated"], true);

    // A read-only portal session reads it too; another organization's key may not read it here,
    // but reads the same catalog under its own organization.
    let (status, session, _) = op
        .call(
            "POST",
            &format!("{}/{ORG}/portal-sessions", op.base),
            k,
            Some(json!({"read_only": true})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
    let portal = session["token"].as_str().unwrap();
    let (status, seen, _) = op.call("GET", &catalog_url(&op, ORG), Some(portal), None).await;
    assert_eq!((status, &seen), (StatusCode::OK, &listed));
    let (status, _, _) = op.call("GET", &catalog_url(&op, ORG), Some(&other_key), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, theirs, _) = op
        .call("GET", &catalog_url(&op, OTHER_ORG), Some(&other_key), None)
        .await;
    assert_eq!((status, &theirs), (StatusCode::OK, &listed));
    let (status, _, _) = op.call("GET", &catalog_url(&op, ORG), None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Creates name catalog types or patterns that match one; 400 names the first that does not.
    let create = |event_types: Value| {
        let op = &op;
        let key = key.clone();
        async move {
            let body = json!({"url": "https://hooks.example.com/b", "event_types": event_types});
            let (status, answer, _) = op.call("POST", &op.url(ORG, ""), Some(&key), Some(body)).await;
            (status, answer)
        }
    };
    let (status, refused) = create(json!(["database.created", "database.dropped"])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .starts_with("event type database.dropped is not in the event-type catalog"),
        "{refused}"
    );
    let (status, refused) = create(json!(["billing.*"])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("pattern billing.* matches no type"),
        "{refused}"
    );
    // Nothing was created by the refusals.
    let (_, list, _) = op.call("GET", &op.url(ORG, ""), k, None).await;
    assert_eq!(list["webhook_endpoints"].as_array().unwrap().len(), 1, "{list}");

    // A deprecated type is accepted with a warning.
    let (status, created) = create(json!(["database.*", "legacy.export_done"])).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(
        created["warnings"],
        json!(["event type legacy.export_done is deprecated"])
    );
    assert_conforms("EndpointWithSecret", &created);
    let (status, created) = create(json!(["database.backup.completed"])).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert!(created.get("warnings").is_none(), "{created}");

    // Updates too: the first endpoint's old subscription stays until it is changed.
    let patch = |event_types: Value| {
        let (op, key, id) = (&op, key.clone(), id.clone());
        async move {
            let (status, answer, _) = op
                .call(
                    "PATCH",
                    &op.url(ORG, &format!("/{id}")),
                    Some(&key),
                    Some(json!({"event_types": event_types})),
                )
                .await;
            (status, answer)
        }
    };
    let (status, refused) = patch(json!(["whatever.happened"])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("whatever.happened"),
        "{refused}"
    );
    let (status, updated) = patch(json!(["legacy.*"])).await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(
        updated["warnings"],
        json!(["event type pattern legacy.* matches only deprecated types"])
    );
    assert_conforms("EndpointResponse", &updated);
    // An update that leaves event types alone is not checked.
    let (status, _, _) = op
        .call(
            "PATCH",
            &op.url(ORG, &format!("/{id}")),
            k,
            Some(json!({"description": "x"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    // A type deleted from the catalog is gone from the listing and from what may be subscribed to.
    let api: Api<WebhookEventType> = Api::namespaced(client.clone(), &ns);
    api.delete("legacy.export-done", &DeleteParams::default())
        .await
        .unwrap();
    listed_becomes(&op, &key, &["database.backup.completed", "database.created"]).await;
    let (status, refused) = patch(json!(["legacy.export_done"])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");

    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn ingest_validates_data_against_the_schema_and_counts_types_outside_the_catalog() {
    let (client, ns, op) = setup("catalog-ingest", Options::dispatching()).await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    // An empty catalog: anything goes and nothing is counted.
    let (status, body) = op.ingest(ORG, "not.in.any.catalog", json!({"x": 1})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(outside_catalog(&op), 0.0);

    seed_catalog(&client, &ns).await;
    listed_becomes(
        &op,
        &key,
        &["database.backup.completed", "database.created", "legacy.export_done"],
    )
    .await;

    let good = json!({"database_id": "db_1", "size_bytes": 10});
    let (status, body) = op.ingest(ORG, "database.backup.completed", good.clone()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, body) = op
        .ingest(
            ORG,
            "database.backup.completed",
            json!({"database_id": "db_1", "size_bytes": -5}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.starts_with(
            "data does not conform to the schema of event type database.backup.completed at \"/size_bytes\": "
        ),
        "{message}"
    );
    assert!(message.contains("minimum"), "{message}");
    let (status, body) = op
        .ingest(ORG, "database.backup.completed", json!({"size_bytes": 1}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("at \"\" (data itself)") && message.contains("database_id"),
        "{message}"
    );
    // A type without a schema takes any object; deprecated types are still accepted.
    for (event_type, data) in [
        ("database.created", json!({"anything": [1, 2]})),
        ("legacy.export_done", json!({})),
    ] {
        let (status, body) = op.ingest(ORG, event_type, data).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{event_type}: {body}");
    }
    assert_eq!(outside_catalog(&op), 0.0);

    // Lenient: a type outside the catalog is accepted and counted.
    let (status, body) = op.ingest(ORG, "billing.invoice.paid", json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(outside_catalog(&op), 1.0);

    // A new version of the schema applies without a restart.
    let api: Api<WebhookEventType> = Api::namespaced(client.clone(), &ns);
    let patch = json!({"spec": {"schema": backup_schema(100)}});
    api.patch(
        "database.backup.completed",
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .unwrap();
    support::wait_for("the new schema applies", Duration::from_secs(15), || async {
        let (status, _) = op.ingest(ORG, "database.backup.completed", good.clone()).await;
        (status == StatusCode::BAD_REQUEST).then_some(())
    })
    .await;
    let (status, body) = op
        .ingest(
            ORG,
            "database.backup.completed",
            json!({"database_id": "db_1", "size_bytes": 100}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn a_strict_operator_refuses_types_outside_a_non_empty_catalog() {
    let opts = Options {
        strict_event_types: true,
        ..Options::dispatching()
    };
    let (client, ns, op) = setup("catalog-strict", opts).await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    // Strict with an empty catalog still accepts every type.
    let (status, body) = op.ingest(ORG, "billing.invoice.paid", json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    create_type(&client, &ns, spec("database.created")).await;
    listed_becomes(&op, &key, &["database.created"]).await;
    let (status, body) = op.ingest(ORG, "billing.invoice.paid", json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        body["error"],
        "event type billing.invoice.paid is not in the event-type catalog, and this operator accepts only catalog types"
    );
    let (status, body) = op.ingest(ORG, "database.created", json!({"id": "db_1"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(outside_catalog(&op), 0.0, "refused events are not counted as accepted");

    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}

/// The commands of the README's block marked `<!-- catalog-test: readme -->` run verbatim (from
/// the repository's root, the bundled kubectl first on PATH), with the curl walk-through's `API`
/// and `AUTH` pointing at a test operator and kubectl's namespace set to its namespace.
#[tokio::test]
async fn the_readmes_catalog_commands_run_verbatim() {
    let (client, ns, op) = setup("catalog-readme", Options::default()).await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let block = readme
        .split_once("<!-- catalog-test: readme -->\n```sh\n")
        .expect("the README marks its catalog commands")
        .1
        .split("```")
        .next()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::copy(support::kubeconfig_path(), &kubeconfig).unwrap();
    let kubectl = support::bin_dir().join("kubectl");
    let out = std::process::Command::new(&kubectl)
        .args(["config", "set-context", "--current", "--namespace", &ns, "--kubeconfig"])
        .arg(&kubeconfig)
        .output()
        .unwrap();
    support::ok("kubectl config set-context", out);
    let path = format!(
        "{}:{}",
        support::bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::task::spawn_blocking({
        let (block, kubeconfig, api) = (block.to_string(), kubeconfig.clone(), format!("{}/{ORG}", op.base));
        let key = key.clone();
        let root = root.to_path_buf();
        move || {
            std::process::Command::new("bash")
                .args(["-euo", "pipefail", "-c", &block])
                .env("PATH", path)
                .env("KUBECONFIG", kubeconfig)
                .env("API", api)
                .env("AUTH", format!("Authorization: Bearer {key}"))
                .current_dir(root)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = support::ok("the README's catalog commands", out);
    assert!(
        stdout.contains("webhookeventtype.webhooks.capydb.io/database.backup.completed created"),
        "{stdout}"
    );
    let header = stdout.lines().find(|l| l.starts_with("NAME")).unwrap_or_default();
    let columns: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(columns, ["NAME", "TYPE", "GROUP", "DEPRECATED", "AGE"], "{stdout}");
    // The curl ran right after the apply: the listing may not have the type yet; the operator's
    // watch picks it up within moments.
    assert!(stdout.contains("\"event_types\""), "{stdout}");
    listed_becomes(&op, &key, &["database.backup.completed"]).await;
    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}
