//! The delivery log's IO: applying a batch of writes, loading every log, reading one endpoint's.

use std::collections::{BTreeMap, BTreeSet};

use futures::FutureExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ListParams, ObjectList, PostParams};
use kube::{Api, Client};
use tracing::{debug, warn};

use super::image::{DeliveryLog, LogConfig, PendingWrites, SegmentWrite};
use super::{COMPONENT, FIELD_MANAGER, LogKey};
use crate::resources::{COMPONENT_LABEL, MANAGED_BY, MANAGED_BY_LABEL, ORGANIZATION_LABEL, Scope};

/// Page size of list calls.
const PAGE_SIZE: u32 = 500;

/// Label selector of every delivery-log ConfigMap.
pub fn log_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY},{COMPONENT_LABEL}={COMPONENT}")
}

/// Whether a write failed because a segment's name is taken by another segment signed with this
/// operator's key (see [`apply_writes`]): the sign of a second writer.
pub fn is_name_taken(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409 && status.message.contains(TAKEN))
}

/// What the error of a taken segment name says.
const TAKEN: &str = "is taken by another segment signed with this operator's key";

/// What the error of a segment name held by something this operator did not write says.
const FOREIGN: &str = "is held by an object this operator did not write";

/// The segment name a write could not use because an object this operator did not write holds
/// it (see [`apply_writes`]): anything that is not a segment, or that carries no valid MAC, such
/// as a squatted name. Not a second writer: the log goes on under the next name, and the object is
/// never written into nor deleted (forget the name with [`super::DeliveryLog::forget_segment`]).
pub fn foreign_segment_name(error: &kube::Error) -> Option<&str> {
    match error {
        kube::Error::Api(status) if status.code == 409 && status.message.contains(FOREIGN) => {
            status.details.as_ref().map(|d| d.name.as_str())
        }
        _ => None,
    }
}

/// Applies a batch from [`super::DeliveryLog::take_writes`] in order, stopping at the first error
/// (then give the batch back with [`super::DeliveryLog::restore`]). Returns the API calls made.
pub async fn apply(
    client: &Client,
    namespace: &str,
    key: &LogKey,
    writes: &PendingWrites,
) -> Result<usize, kube::Error> {
    apply_writes(client, namespace, key, writes.writes()).await
}

/// Applies writes in order, stopping at the first error; returns the API calls made. Use it on
/// [`PendingWrites::creates`] then [`PendingWrites::deletes`] to learn when a batch is durable.
///
/// A create that finds the segment already there is fine when the one there carries the same MAC
/// (a create that succeeded but whose answer was lost); any other object of that name is never
/// written into, and the write fails: as a second writer ([`is_name_taken`]) when the object there
/// is a segment signed with `key`, else as a foreign name ([`foreign_segment_name`]), which no
/// one without the key can turn into more than a skipped name. A delete of a segment already gone
/// is fine.
pub async fn apply_writes(
    client: &Client,
    namespace: &str,
    key: &LogKey,
    writes: &[SegmentWrite],
) -> Result<usize, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let post = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let mut calls = 0;
    for write in writes {
        calls += 1;
        match write {
            SegmentWrite::Create(cm) => match api.create(&post, cm).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    calls += 1;
                    let name = write.name();
                    // Ours only if it carries our MAC of this very content (a create whose answer
                    // was lost); anything else took the name, and is never written into.
                    let existing = api.get_opt(name).await?;
                    let mac = |c: &ConfigMap| {
                        c.metadata
                            .annotations
                            .as_ref()
                            .and_then(|a| a.get(super::MAC_ANNOTATION))
                            .cloned()
                    };
                    let ours = mac(cm).is_some() && existing.as_ref().is_some_and(|e| mac(e) == mac(cm));
                    let signed_segment = existing.as_ref().is_some_and(|e| {
                        let labels = e.metadata.labels.as_ref();
                        let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
                        label(MANAGED_BY_LABEL) == Some(MANAGED_BY)
                            && label(COMPONENT_LABEL) == Some(COMPONENT)
                            && key.verify(e)
                    });
                    if !ours && !signed_segment {
                        // Anything this operator did not write under a segment's name (or
                        // nothing, if it went meanwhile) is no sign of a second writer: only the
                        // key's holder can sign. The log moves on to the next name.
                        warn!(
                            namespace,
                            configmap = name,
                            "a delivery-log segment name is held by an object this operator did not write; \
                             it is left alone and the log is written under the next name"
                        );
                        return Err(kube::Error::Api(Box::new(
                            kube::core::Status::failure(
                                &format!("delivery-log segment {name} {FOREIGN}"),
                                "AlreadyExists",
                            )
                            .with_code(409)
                            .with_details(kube::core::response::StatusDetails {
                                name: name.to_string(),
                                group: String::new(),
                                kind: "configmaps".into(),
                                uid: String::new(),
                                causes: Vec::new(),
                                retry_after_seconds: 0,
                            }),
                        )));
                    }
                    if !ours {
                        warn!(
                            namespace,
                            configmap = name,
                            "a delivery-log segment name is taken by another segment signed with this operator's key; \
                             a second writer of this log is running"
                        );
                        return Err(kube::Error::Api(Box::new(
                            kube::core::Status::failure(
                                &format!("delivery-log segment {name} {TAKEN}"),
                                "AlreadyExists",
                            )
                            .with_code(409),
                        )));
                    }
                    debug!(namespace, configmap = name, "delivery-log segment already written");
                }
                Err(e) => return Err(e),
            },
            SegmentWrite::Delete { name } => match api.delete(name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(e),
            },
        }
    }
    Ok(calls)
}

async fn list_all(api: &Api<ConfigMap>, selector: &str) -> Result<Vec<ConfigMap>, kube::Error> {
    list_pages(selector, |params| async move { api.list(&params).await }).await
}

/// Every item matching `selector`, fetched page by page with `list` (full objects or metadata).
async fn list_pages<T, Page>(selector: &str, list: impl Fn(ListParams) -> Page) -> Result<Vec<T>, kube::Error>
where
    T: Clone,
    Page: Future<Output = Result<ObjectList<T>, kube::Error>>,
{
    let mut items = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut params = ListParams::default().labels(selector).limit(PAGE_SIZE);
        if let Some(token) = &token {
            params = params.continue_token(token);
        }
        let page = list(params).await?;
        items.extend(page.items);
        match page.metadata.continue_ {
            Some(next) if !next.is_empty() => token = Some(next),
            _ => return Ok(items),
        }
    }
}

/// Every delivery-log segment in scope (paginated); group them with [`group_by_organization`].
pub async fn load_all(client: &Client, scope: &Scope) -> Result<Vec<ConfigMap>, kube::Error> {
    list_all(&scope.api::<ConfigMap>(client.clone()), &log_selector()).await
}

/// How many organizations one LIST of [`load_organizations_where`] names in its selector (keeps
/// the request line short).
const ORGANIZATIONS_PER_LIST: usize = 32;

/// The delivery-log segments of the organizations `wanted` picks, in scope: a metadata-only LIST
/// (names and labels, no content) finds the organizations that have segments, then only theirs
/// are read in full. A replica taking a few shards so reads its own share of the logs, not every
/// log of the cluster.
pub async fn load_organizations_where(
    client: &Client,
    scope: &Scope,
    wanted: impl Fn(&str) -> bool,
) -> Result<Vec<ConfigMap>, kube::Error> {
    let api = &scope.api::<ConfigMap>(client.clone());
    let segments = list_pages(
        &log_selector(),
        |params| async move { api.list_metadata(&params).await },
    )
    .await?;
    // Sorted and each once, for the chunks below.
    let organizations: Vec<String> = segments
        .iter()
        .filter_map(|m| m.metadata.labels.as_ref()?.get(ORGANIZATION_LABEL))
        .filter(|org| wanted(org))
        .cloned()
        .collect::<BTreeSet<String>>()
        .into_iter()
        .collect();
    let mut items = Vec::new();
    for chunk in organizations.chunks(ORGANIZATIONS_PER_LIST) {
        items.extend(list_all(api, &organizations_selector(chunk)).await?);
    }
    Ok(items)
}

/// The label selector of the segments of `organizations` (valid label values, as every
/// organization id that labels a segment is).
fn organizations_selector(organizations: &[String]) -> String {
    format!(
        "{},{ORGANIZATION_LABEL} in ({})",
        log_selector(),
        organizations.join(",")
    )
}

/// Segments grouped by (namespace, organization), ready for
/// [`super::DeliveryLog::from_configmaps`]. Segments naming no organization are skipped with a
/// warning.
pub fn group_by_organization(configmaps: Vec<ConfigMap>) -> BTreeMap<(String, String), Vec<ConfigMap>> {
    let mut groups: BTreeMap<(String, String), Vec<ConfigMap>> = BTreeMap::new();
    for cm in configmaps {
        let organization = cm
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ORGANIZATION_LABEL))
            .cloned();
        let (Some(namespace), Some(organization)) = (cm.metadata.namespace.clone(), organization) else {
            warn!(
                configmap = cm.metadata.name.as_deref().unwrap_or_default(),
                "delivery-log segment names no organization; ignored"
            );
            continue;
        };
        groups.entry((namespace, organization)).or_default().push(cm);
    }
    groups
}

/// Every delivery-log segment in a scope, kept by a watch, for a process that serves the
/// deliveries route without running the dispatcher: a request reads memory, not the API server.
/// Segments are kept as stored (compressed), so the copy costs what etcd holds.
#[derive(Clone)]
pub struct LogWatch {
    store: kube::runtime::reflector::Store<ConfigMap>,
    key: super::LogKey,
}

impl LogWatch {
    /// Starts the watch in the background; only segments signed with `key` are read.
    pub fn start(client: Client, scope: &Scope, key: super::LogKey) -> Self {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, reflector, watcher};
        let api: Api<ConfigMap> = scope.api(client);
        let (store, writer) = reflector::store();
        let stream = reflector::reflector(
            writer,
            watcher(api, watcher::Config::default().labels(&log_selector())).default_backoff(),
        );
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    warn!(error = %e, "delivery-log watch failed; retrying");
                }
            }
        });
        Self { store, key }
    }

    /// One organization's log in one namespace, from the watch, of the segments this operator
    /// wrote (`endpoint_uid` names the current uid of an endpoint, for first-format segments).
    /// `None` until the first list is in.
    pub fn read(
        &self,
        namespace: &str,
        organization_id: &str,
        config: LogConfig,
        endpoint_uid: impl Fn(&str) -> Option<String> + Copy,
    ) -> Option<DeliveryLog> {
        self.store.wait_until_ready().now_or_never()?.ok()?;
        let segments = self.store.state().into_iter().filter(|cm| {
            cm.metadata.namespace.as_deref() == Some(namespace)
                && cm
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(ORGANIZATION_LABEL))
                    .map(String::as_str)
                    == Some(organization_id)
                && super::judge_segment(cm, &self.key, endpoint_uid).is_ok()
        });
        Some(DeliveryLog::from_configmaps(
            namespace,
            organization_id,
            config,
            segments.map(|cm| (*cm).clone()),
        ))
    }
}

/// One organization's log in one namespace, read back from the API server.
pub async fn read_organization(
    client: &Client,
    namespace: &str,
    organization_id: &str,
    config: LogConfig,
) -> Result<DeliveryLog, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let selector = format!("{},{ORGANIZATION_LABEL}={organization_id}", log_selector());
    let segments = list_all(&api, &selector).await?;
    Ok(DeliveryLog::from_configmaps(
        namespace,
        organization_id,
        config,
        segments,
    ))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn segment(namespace: &str, name: &str, organization: Option<&str>) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                labels: organization.map(|o| BTreeMap::from([(ORGANIZATION_LABEL.to_string(), o.to_string())])),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_selector_of_some_organizations_keeps_to_the_log_and_names_each() {
        let selector = organizations_selector(&["org_a".into(), "org-b".into()]);
        assert_eq!(
            selector,
            format!("{},{ORGANIZATION_LABEL} in (org_a,org-b)", log_selector())
        );
        // The request line stays short at the chunk size, with the longest label values.
        let longest: Vec<String> = (0..ORGANIZATIONS_PER_LIST).map(|i| format!("{i:0>63}")).collect();
        assert!(organizations_selector(&longest).len() < 4096);
    }

    #[test]
    fn segments_group_by_namespace_and_organization() {
        let cms = vec![
            segment("a", "o1-x-journal-1", Some("org_1")),
            segment("a", "ep1-deliveries-2", Some("org_1")),
            segment("b", "o1-x-journal-1", Some("org_1")),
            segment("a", "o2-x-journal-1", Some("org_2")),
            segment("a", "stray", None),
        ];
        let groups = group_by_organization(cms);
        let sizes: Vec<(&str, &str, usize)> = groups
            .iter()
            .map(|((ns, org), cms)| (ns.as_str(), org.as_str(), cms.len()))
            .collect();
        assert_eq!(sizes, [("a", "org_1", 2), ("a", "org_2", 1), ("b", "org_1", 1)]);
        assert_eq!(
            log_selector(),
            "app.kubernetes.io/managed-by=capy-webhooks,app.kubernetes.io/component=delivery-log"
        );
    }
}
