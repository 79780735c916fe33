//! Keys the operator makes for itself and keeps in Secrets of its home namespace (the delivery
//! log's MAC key, the portal-session key): read if present, created with 32 random bytes if not,
//! the first writer winning when several replicas start at once.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::info;

use crate::resources::{MANAGED_BY, MANAGED_BY_LABEL};

/// Data key of the key in each key Secret.
pub const KEY_DATA: &str = "key";
/// Field manager of the key Secrets this module creates.
const FIELD_MANAGER: &str = "capy-webhooks-operator-keys";

/// Reads the 32-byte key of Secret `name` in `namespace`, creating the Secret (with
/// `annotations`) when it does not exist. Returns the key and the Secret as stored.
pub async fn load_or_create(
    client: &Client,
    namespace: &str,
    name: &str,
    annotations: BTreeMap<String, String>,
) -> anyhow::Result<([u8; 32], Secret)> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = match secrets.get_opt(name).await? {
        Some(secret) => secret,
        None => {
            let key: [u8; 32] = rand::random();
            let fresh = Secret {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    labels: Some(BTreeMap::from([(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string())])),
                    annotations: Some(annotations),
                    ..Default::default()
                },
                type_: Some("Opaque".into()),
                data: Some(BTreeMap::from([(KEY_DATA.to_string(), ByteString(key.to_vec()))])),
                ..Default::default()
            };
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            match secrets.create(&params, &fresh).await {
                Ok(created) => {
                    info!(namespace, secret = name, "key Secret created");
                    created
                }
                // Another process created it first: use theirs.
                Err(kube::Error::Api(s)) if s.code == 409 => secrets.get(name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(KEY_DATA))
        .map(|b| b.0.clone())
        .unwrap_or_default();
    let key: [u8; 32] = bytes.try_into().map_err(|_| {
        anyhow::anyhow!("Secret {namespace}/{name} holds no 32-byte `{KEY_DATA}`; delete it to start over")
    })?;
    Ok((key, secret))
}
