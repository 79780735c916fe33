//! Which namespaces may serve which organizations.
//!
//! Whoever may create a `WebhookEndpoint` in a namespace could otherwise name any organization in
//! `spec.organizationId` and receive its events. So an endpoint serves organization O only if it
//! lives in the home namespace (where the REST facade creates endpoints and API keys live) or in a
//! namespace labelled `webhooks.capydb.io/organization-id=O` — a label only the platform team sets.
//! The REST facade, the dispatcher and the controller all ask [`NamespaceBinding::serves`]
//! (through the endpoint cache), so a refused endpoint gets no secret, no deliveries, and appears
//! in no REST answer.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tracing::warn;

use crate::resources::{ORGANIZATION_LABEL, Scope};

/// Whether an endpoint in `namespace` may serve `organization`, given the home namespace and the
/// namespace's organization label. Pure: the rule itself.
pub fn namespace_serves(home: &str, namespace: &str, namespace_organization: Option<&str>, organization: &str) -> bool {
    !organization.is_empty() && (namespace == home || namespace_organization == Some(organization))
}

/// The binding of namespaces to organizations, kept from a metadata watch of Namespaces where
/// namespaces other than the home one are served.
#[derive(Clone)]
pub struct NamespaceBinding {
    home: String,
    /// `None` when only the home namespace is served: nothing to watch.
    namespaces: Option<Store<PartialObjectMeta<Namespace>>>,
    /// Grows whenever a namespace's labels change, so the controller can look again.
    changes: watch::Receiver<u64>,
}

impl NamespaceBinding {
    /// Serves only the home namespace (no watch, no RBAC on Namespaces).
    pub fn home_only(home: &str) -> Self {
        Self {
            home: home.to_string(),
            namespaces: None,
            changes: watch::channel(0).1,
        }
    }

    /// The binding for `scope`: with every namespace served (or one other than home), Namespaces'
    /// labels are watched; that needs get, list and watch on `namespaces`.
    pub fn start(client: Client, scope: &Scope, home: &str) -> Self {
        let config = match scope {
            Scope::Namespace(ns) if ns == home => return Self::home_only(home),
            Scope::Namespace(ns) => watcher::Config::default().fields(&format!("metadata.name={ns}")),
            Scope::AllNamespaces => watcher::Config::default(),
        };
        let api: Api<PartialObjectMeta<Namespace>> = Api::all(client);
        let (store, writer) = reflector::store();
        let (tx, rx) = watch::channel(0u64);
        let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) => tx.send_modify(|n| *n += 1),
                    Err(e) => warn!(error = %e, "namespace watch failed; retrying"),
                }
            }
        });
        Self {
            home: home.to_string(),
            namespaces: Some(store),
            changes: rx,
        }
    }

    /// Waits until the namespaces are listed: until then every namespace but home looks unbound,
    /// and nothing may act on that.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        if let Some(store) = &self.namespaces {
            loop {
                match tokio::time::timeout(Duration::from_millis(200), store.wait_until_ready()).await {
                    Ok(result) => {
                        return result.map_err(|e| anyhow::anyhow!("namespace watch never synced: {e}"));
                    }
                    Err(_) => continue,
                }
            }
        }
        Ok(())
    }

    /// Whether an endpoint in `namespace` may serve `organization`.
    pub fn serves(&self, namespace: &str, organization: &str) -> bool {
        let label = self.namespaces.as_ref().and_then(|store| {
            store
                .get(&ObjectRef::new(namespace))
                .and_then(|ns| ns.labels().get(ORGANIZATION_LABEL).cloned())
        });
        namespace_serves(&self.home, namespace, label.as_deref(), organization)
    }

    /// A signal that grows whenever namespaces' labels change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_serves_every_organization_other_namespaces_only_their_label() {
        assert!(namespace_serves("capy", "capy", None, "org_a"));
        assert!(
            namespace_serves("capy", "capy", Some("org_b"), "org_a"),
            "home ignores labels"
        );
        assert!(namespace_serves("capy", "team-a", Some("org_a"), "org_a"));
        assert!(!namespace_serves("capy", "team-a", Some("org_b"), "org_a"));
        assert!(!namespace_serves("capy", "team-a", None, "org_a"));
        assert!(
            !namespace_serves("capy", "team-a", Some(""), ""),
            "an empty label binds nothing"
        );
    }

    #[test]
    fn home_only_binding_refuses_other_namespaces() {
        let binding = NamespaceBinding::home_only("capy");
        assert!(binding.serves("capy", "org_a"));
        assert!(!binding.serves("elsewhere", "org_a"));
    }
}
