//! A watch-backed cache of WebhookEndpoints, shared by the REST facade (reads, read-your-writes
//! waits) and the dispatcher (fan-out, endpoint settings, wake-ups on change).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::reflector::{self, ObjectRef, ReflectHandle, Store};
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{broadcast, watch};
use tracing::warn;

use crate::resources::{Scope, WebhookEndpoint};
use crate::tenancy::NamespaceBinding;

/// A watch-backed cache of endpoints, with a signal that fires on every change so writers can
/// wait for the controller's status or for their own write to show up.
#[derive(Clone)]
pub struct EndpointCache {
    store: Store<WebhookEndpoint>,
    changes: watch::Receiver<u64>,
    changed: broadcast::Sender<ObjectRef<WebhookEndpoint>>,
    versions: Arc<Mutex<Versions>>,
    feed: Arc<Mutex<Option<ControllerFeed>>>,
    binding: NamespaceBinding,
}

/// Changes the controller may lag behind before the cache waits for it.
const CONTROLLER_FEED_BUFFER: usize = 1024;

/// What the controller runs on: the cache's store and a stream of the endpoints that changed.
pub struct ControllerFeed {
    /// Every endpoint that changed (each one once the initial list is in).
    pub trigger: ReflectHandle<WebhookEndpoint>,
    /// The cache's store.
    pub store: Store<WebhookEndpoint>,
    /// Which namespaces may serve which organizations.
    pub binding: NamespaceBinding,
    /// Every endpoint the watch saw deleted, as it was last (a deletion hidden in a relist, after
    /// the watch fell behind, is not seen).
    pub deleted: broadcast::Receiver<Arc<WebhookEndpoint>>,
}

/// Change counters: the value of the global counter at each organization's last change, and at
/// the last change that could concern any organization (a relist).
#[derive(Default)]
struct Versions {
    by_organization: HashMap<String, u64>,
    any: u64,
}

impl EndpointCache {
    /// Starts the reflector in the background and returns the cache (not yet synced). With
    /// `feeds_controller`, the controller's trigger stream is prepared too: take it with
    /// [`Self::controller_feed`] and run the controller, or the cache stalls once its buffer fills.
    ///
    /// Every query but the controller's feed answers only endpoints whose namespace may serve
    /// their organization (`binding`).
    pub fn start(client: Client, scope: &Scope, binding: NamespaceBinding, feeds_controller: bool) -> Self {
        let api: Api<WebhookEndpoint> = scope.api(client);
        // One cache for the whole process: the controller reads this store and is triggered by
        // its changes instead of keeping a second copy of every endpoint.
        let (store, writer) = reflector::store_shared(CONTROLLER_FEED_BUFFER);
        let trigger = if feeds_controller { writer.subscribe() } else { None };
        let (deletions, deleted) = broadcast::channel(CONTROLLER_FEED_BUFFER);
        let feed = trigger.map(|trigger| ControllerFeed {
            trigger,
            store: store.clone(),
            binding: binding.clone(),
            deleted,
        });
        let (tx, rx) = watch::channel(0u64);
        let (changed, _) = broadcast::channel(4096);
        let notify = changed.clone();
        let versions: Arc<Mutex<Versions>> = Arc::default();
        let seen = versions.clone();
        // managedFields' field sets are the bulk of a cached object and nothing reads them; their
        // times stay (the REST `updated_at` is derived from them).
        let events = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|ep: &mut WebhookEndpoint| {
                for entry in ep.metadata.managed_fields.iter_mut().flatten() {
                    entry.fields_v1 = None;
                }
            });
        let stream = reflector::reflector(writer, events);
        let tx = Arc::new(tx);
        // A namespace's label may bind or unbind every endpoint in it: treat it as a change of
        // every organization.
        let mut namespace_changes = binding.changes();
        let (bump, relabelled) = (tx.clone(), versions.clone());
        tokio::spawn(async move {
            while namespace_changes.changed().await.is_ok() {
                bump.send_modify(|n| {
                    *n += 1;
                    relabelled.lock().expect("versions lock").any = *n;
                });
            }
        });
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                if let Ok(Event::Delete(ep)) = &event {
                    // No receiver (no controller here, or none leading) is fine.
                    let _ = deletions.send(Arc::new(ep.clone()));
                }
                match event {
                    Ok(Event::Apply(ep) | Event::Delete(ep) | Event::InitApply(ep)) => {
                        let _ = notify.send(ObjectRef::from(&ep));
                        tx.send_modify(|n| {
                            *n += 1;
                            let mut versions = seen.lock().expect("versions lock");
                            versions.by_organization.insert(ep.spec.organization_id.clone(), *n);
                        });
                    }
                    Ok(_) => tx.send_modify(|n| {
                        *n += 1;
                        seen.lock().expect("versions lock").any = *n;
                    }),
                    Err(e) => warn!(error = %e, "endpoint watch failed; retrying"),
                }
            }
        });
        Self {
            store,
            changes: rx,
            changed,
            versions,
            feed: Arc::new(Mutex::new(feed)),
            binding,
        }
    }

    /// The controller's feed, once: `None` if the cache was started without one or it was taken.
    pub fn controller_feed(&self) -> Option<ControllerFeed> {
        self.feed.lock().expect("feed lock").take()
    }

    /// Waits until the initial list of endpoints, and of the namespaces that bind organizations,
    /// is in.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        store_ready(&self.store)
            .await
            .map_err(|e| anyhow::anyhow!("endpoint cache never synced: {e}"))?;
        self.binding.wait_ready().await
    }

    /// The binding of namespaces to organizations this cache answers by.
    pub fn binding(&self) -> &NamespaceBinding {
        &self.binding
    }

    /// Whether the endpoint's namespace may serve the organization it names.
    fn bound(&self, endpoint: &WebhookEndpoint) -> bool {
        endpoint
            .metadata
            .namespace
            .as_deref()
            .is_some_and(|ns| self.binding.serves(ns, &endpoint.spec.organization_id))
    }

    /// A number that grows with every change to one organization's endpoints seen by the watch
    /// (for caches built on this one: another organization's changes leave it alone).
    pub fn version_of(&self, organization_id: &str) -> u64 {
        let versions = self.versions.lock().expect("versions lock");
        let own = versions.by_organization.get(organization_id).copied().unwrap_or(0);
        own.max(versions.any)
    }

    /// Endpoints that changed (or were deleted) from now on. A receiver that lags behind gets
    /// `RecvError::Lagged` and should treat every endpoint as changed.
    pub fn subscribe(&self) -> broadcast::Receiver<ObjectRef<WebhookEndpoint>> {
        self.changed.subscribe()
    }

    /// One endpoint by namespace and name, if its namespace may serve its organization.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<WebhookEndpoint>> {
        self.store
            .get(&ObjectRef::new(name).within(namespace))
            .filter(|e| self.bound(e))
    }

    /// One endpoint by namespace and name as stored, bound or not: only to tell an endpoint
    /// whose namespace stopped serving its organization for now (its deliveries wait) from one
    /// that is gone. Never for answering or sending.
    pub fn stored(&self, namespace: &str, name: &str) -> Option<Arc<WebhookEndpoint>> {
        self.store.get(&ObjectRef::new(name).within(namespace))
    }

    /// Every cached endpoint of one organization, in listing order.
    pub fn list(&self, organization_id: &str) -> Vec<Arc<WebhookEndpoint>> {
        let mut found: Vec<_> = self
            .store
            .state()
            .into_iter()
            .filter(|e| e.spec.organization_id == organization_id && self.bound(e))
            .collect();
        sort_for_listing(&mut found);
        found
    }

    /// One endpoint of one organization. Another organization's endpoint is "not found".
    pub fn find(&self, scope: &Scope, organization_id: &str, id: &str) -> Option<Arc<WebhookEndpoint>> {
        let found = match scope {
            Scope::Namespace(ns) => self.store.get(&ObjectRef::new(id).within(ns)),
            Scope::AllNamespaces => self
                .store
                .find(|e| e.name_any() == id && e.spec.organization_id == organization_id && self.bound(e)),
        };
        found.filter(|e| self.serves(e, organization_id))
    }

    /// Whether `endpoint` is one of `organization_id`'s that may be acted on: it names that
    /// organization, is not being deleted, and its namespace is bound to the organization. The
    /// one rule for the REST facade ([`Self::find`]) and for work another replica asks for
    /// ([`Self::resolve`]).
    fn serves(&self, endpoint: &WebhookEndpoint, organization_id: &str) -> bool {
        endpoint.spec.organization_id == organization_id
            && endpoint.metadata.deletion_timestamp.is_none()
            && self.bound(endpoint)
    }

    /// The endpoint a [`crate::work::EndpointRef`] names, if this cache has it with that uid and
    /// it [serves](Self::serves) the organization the reference names; otherwise nothing is
    /// believed of the reference.
    pub fn resolve(&self, reference: &crate::work::EndpointRef) -> Option<Arc<WebhookEndpoint>> {
        self.store
            .get(&ObjectRef::new(&reference.name).within(&reference.namespace))
            .filter(|e| {
                !reference.uid.is_empty()
                    && e.metadata.uid.as_deref() == Some(reference.uid.as_str())
                    && self.serves(e, &reference.organization_id)
            })
    }

    /// Waits up to `timeout` until the cache holds `(namespace, name)` with `uid`.
    pub async fn wait_for_uid(&self, namespace: &str, name: &str, uid: &str, timeout: Duration) {
        self.wait_for(namespace, name, timeout, |e| {
            e.filter(|e| e.metadata.uid.as_deref() == Some(uid)).map(|_| ())
        })
        .await;
    }

    /// Waits up to `timeout` for `check` to return `Some` on the cached object `(ns, name)`
    /// (or on its absence, given as `None`).
    pub async fn wait_for<T>(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
        mut check: impl FnMut(Option<&WebhookEndpoint>) -> Option<T>,
    ) -> Option<T> {
        let key = ObjectRef::new(name).within(namespace);
        let mut changes = self.changes.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            changes.borrow_and_update();
            if let Some(found) = check(self.store.get(&key).as_deref()) {
                return Some(found);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return None,
            }
        }
    }
}

/// First wait between attempts of [`wait_until_listable`]; it doubles up to the second.
const LIST_RETRY_FIRST: Duration = Duration::from_millis(500);
const LIST_RETRY_MAX: Duration = Duration::from_secs(30);

/// Waits until the API server answers a list of WebhookEndpoints in `scope`, before any cache of
/// them starts. Fails when the answer shows the installation is wrong ([`is_installation_error`]):
/// no such cache would ever fill, and waiting cannot fix it. Other failures (the API server is
/// unreachable or overloaded) are logged and retried, from 0.5 s doubling to 30 s.
pub async fn wait_until_listable(client: Client, scope: &Scope) -> anyhow::Result<()> {
    let endpoints: Api<WebhookEndpoint> = scope.api(client);
    let mut failures = 0;
    while let Err(e) = endpoints
        .list_metadata(&kube::api::ListParams::default().limit(1))
        .await
    {
        if is_installation_error(&e) {
            anyhow::bail!(
                "cannot list WebhookEndpoints ({e}); is the CRD installed and may this identity list \
                 them? Run `kubectl apply -f crds/` (or `capy-webhooks crd | kubectl apply -f -`) and \
                 check the ClusterRole of the Helm chart"
            );
        }
        failures += 1;
        let retry_in = crate::backoff::doubling(failures, LIST_RETRY_FIRST, LIST_RETRY_MAX);
        warn!(error = %e, ?retry_in, "cannot list WebhookEndpoints yet; retrying");
        tokio::time::sleep(retry_in).await;
    }
    Ok(())
}

/// Whether a failed list means the installation is wrong: the CRD is missing (404), or this
/// identity may not list (403) or is not recognised (401).
pub fn is_installation_error(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if matches!(status.code, 401 | 403 | 404))
}

/// Waits until `store` has its first full list, like `Store::wait_until_ready`, but safe with
/// several waiters: kube-runtime's readiness signal wakes only the task that polled it last, so
/// a second waiter (say, the controller's own runner and a readiness probe) could sleep forever.
/// Polling again every 200 ms makes every waiter see it.
pub async fn store_ready<K>(store: &Store<K>) -> Result<(), reflector::store::WriterDropped>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(result) = tokio::time::timeout(Duration::from_millis(200), store.wait_until_ready()).await {
            return result;
        }
    }
}

/// Orders endpoints for listing: creation time, then id.
fn sort_for_listing(endpoints: &mut [std::sync::Arc<WebhookEndpoint>]) {
    endpoints.sort_by(|a, b| {
        let key = |e: &WebhookEndpoint| (e.metadata.creation_timestamp.as_ref().map(|t| t.0), e.name_any());
        key(a).cmp(&key(b))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_about_the_installation_end_the_start() {
        let api = |code| kube::Error::Api(Box::new(kube::core::Status::failure("x", "y").with_code(code)));
        for code in [401, 403, 404] {
            assert!(is_installation_error(&api(code)), "{code}");
        }
        for code in [429, 500, 503, 504] {
            assert!(!is_installation_error(&api(code)), "{code}");
        }
        let unreachable = kube::Error::Service("connection refused".into());
        assert!(!is_installation_error(&unreachable));
    }
}
