//! The delivery log's IO: applying a batch of writes, loading every log, reading one endpoint's.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tracing::{debug, warn};

use super::image::{PendingWrites, SegmentWrite};
use super::record::{self, DeliveryRecord};
use super::{COMPONENT, FIELD_MANAGER, endpoint_label_value};
use crate::resources::{COMPONENT_LABEL, ENDPOINT_LABEL, GROUP, MANAGED_BY, MANAGED_BY_LABEL, Scope};

/// Page size of list calls.
const PAGE_SIZE: u32 = 500;

/// Label selector of every delivery-log ConfigMap.
pub fn log_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY},{COMPONENT_LABEL}={COMPONENT}")
}

/// Applies a batch from [`super::EndpointLog::take_writes`] in order, stopping at the first error
/// (then give the batch back with [`super::EndpointLog::restore`]). Returns the API calls made.
pub async fn apply(client: &Client, namespace: &str, writes: &PendingWrites) -> Result<usize, kube::Error> {
    apply_writes(client, namespace, writes.writes()).await
}

/// Applies writes in order, stopping at the first error; returns the API calls made. Use it on
/// [`PendingWrites::creates`] then [`PendingWrites::deletes`] to learn when a batch is durable.
///
/// A create that finds the segment already there (names are never reused, so only a create that
/// succeeded but whose answer was lost) merges its data in instead; a delete of a segment already
/// gone is fine.
pub async fn apply_writes(client: &Client, namespace: &str, writes: &[SegmentWrite]) -> Result<usize, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let post = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let patch_params = PatchParams {
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
                    debug!(
                        namespace,
                        configmap = name,
                        "delivery-log segment exists: merging its data"
                    );
                    let patch = json!({
                        "metadata": { "labels": cm.metadata.labels },
                        "data": cm.data,
                    });
                    api.patch(name, &patch_params, &Patch::Merge(&patch)).await?;
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
    let mut items = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut params = ListParams::default().labels(selector).limit(PAGE_SIZE);
        if let Some(token) = &token {
            params = params.continue_token(token);
        }
        let page = api.list(&params).await?;
        items.extend(page.items);
        match page.metadata.continue_ {
            Some(next) if !next.is_empty() => token = Some(next),
            _ => return Ok(items),
        }
    }
}

/// Every delivery-log segment in scope (paginated); group them with [`group_by_endpoint`].
pub async fn load_all(client: &Client, scope: &Scope) -> Result<Vec<ConfigMap>, kube::Error> {
    list_all(&scope.api::<ConfigMap>(client.clone()), &log_selector()).await
}

/// The endpoint a segment belongs to: the name in its `WebhookEndpoint` owner reference, else its
/// endpoint label (which is shortened for names longer than 63 characters).
pub fn endpoint_of(cm: &ConfigMap) -> Option<String> {
    let group_prefix = format!("{GROUP}/");
    let owner = cm
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "WebhookEndpoint" && o.api_version.starts_with(&group_prefix));
    match owner {
        Some(o) => Some(o.name.clone()),
        None => cm.metadata.labels.as_ref()?.get(ENDPOINT_LABEL).cloned(),
    }
}

/// Segments grouped by (namespace, endpoint name), ready for
/// [`super::EndpointLog::from_configmaps`]. Segments naming no endpoint are skipped with a warning.
pub fn group_by_endpoint(configmaps: Vec<ConfigMap>) -> BTreeMap<(String, String), Vec<ConfigMap>> {
    let mut groups: BTreeMap<(String, String), Vec<ConfigMap>> = BTreeMap::new();
    for cm in configmaps {
        let (Some(namespace), Some(endpoint)) = (cm.metadata.namespace.clone(), endpoint_of(&cm)) else {
            warn!(
                configmap = cm.metadata.name.as_deref().unwrap_or_default(),
                "delivery-log segment names no endpoint; ignored"
            );
            continue;
        };
        groups.entry((namespace, endpoint)).or_default().push(cm);
    }
    groups
}

/// Up to `limit` records of these segments, newest first (`created_at`, then id). Undecodable
/// values are skipped; a record in several segments counts once: its copy in the newest segment
/// (the log is a journal, see [`super::EndpointLog`]).
pub fn newest_first_from_configmaps(configmaps: &[ConfigMap], limit: usize) -> Vec<DeliveryRecord> {
    let mut records: HashMap<String, DeliveryRecord> = HashMap::new();
    let mut oldest_first: Vec<&ConfigMap> = configmaps.iter().collect();
    oldest_first.sort_by_key(|cm| cm.metadata.name.as_deref().and_then(super::segment_seq));
    for cm in oldest_first {
        for (key, value) in cm.data.iter().flatten() {
            match DeliveryRecord::from_stored(value) {
                Ok(r) if &r.id == key => {
                    records.insert(key.clone(), r);
                }
                _ => debug!(configmap = cm.metadata.name.as_deref().unwrap_or_default(), key = %key,
                    "undecodable delivery record skipped"),
            }
        }
    }
    let mut records: Vec<DeliveryRecord> = records.into_values().collect();
    records.sort_by(record::newest_first);
    records.truncate(limit);
    records
}

/// Up to `limit` records of one endpoint's log, newest first, read from the API server.
pub async fn read_endpoint(
    client: &Client,
    namespace: &str,
    endpoint: &str,
    limit: usize,
) -> Result<Vec<DeliveryRecord>, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let selector = format!("{},{ENDPOINT_LABEL}={}", log_selector(), endpoint_label_value(endpoint));
    let mut segments = list_all(&api, &selector).await?;
    segments.retain(|cm| endpoint_of(cm).as_deref() == Some(endpoint));
    Ok(newest_first_from_configmaps(&segments, limit))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    use super::*;
    use crate::delivery_log::DeliveryState;
    use crate::delivery_log::record::tests::{record, ts};

    fn segment(
        namespace: &str,
        name: &str,
        owner: Option<&str>,
        label: Option<&str>,
        records: &[DeliveryRecord],
    ) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                labels: label.map(|l| BTreeMap::from([(ENDPOINT_LABEL.to_string(), l.to_string())])),
                owner_references: owner.map(|o| {
                    vec![OwnerReference {
                        api_version: "webhooks.capydb.io/v1".into(),
                        kind: "WebhookEndpoint".into(),
                        name: o.into(),
                        uid: "u".into(),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            },
            data: Some(records.iter().map(|r| (r.id.clone(), r.to_stored())).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn segments_group_by_namespace_and_owner() {
        let long = "e".repeat(100);
        let cms = vec![
            segment("a", "ep1-deliveries-1", Some("ep1"), Some("ep1"), &[]),
            segment("a", "ep1-deliveries-2", None, Some("ep1"), &[]),
            segment("b", "ep1-deliveries-1", Some("ep1"), Some("ep1"), &[]),
            segment(
                "a",
                "x-deliveries-1",
                Some(&long),
                Some(&endpoint_label_value(&long)),
                &[],
            ),
            segment("a", "stray", None, None, &[]),
        ];
        let groups = group_by_endpoint(cms);
        let sizes: Vec<(&str, &str, usize)> = groups
            .iter()
            .map(|((ns, ep), cms)| (ns.as_str(), &ep[..3], cms.len()))
            .collect();
        assert_eq!(sizes, [("a", "eee", 1), ("a", "ep1", 2), ("b", "ep1", 1)]);
        assert!(groups.contains_key(&("a".to_string(), long)));
    }

    #[test]
    fn reading_configmaps_sorts_dedupes_and_skips_garbage() {
        let r = |n| record(n, DeliveryState::Pending);
        let mut newer = r(2);
        newer.state = DeliveryState::Succeeded;
        newer.updated_at = ts(100);
        // The copy in the newer segment wins, whatever its updated_at: the log is a journal.
        let mut stale = r(3);
        stale.updated_at = ts(200);
        let mut first = segment("a", "ep1-deliveries-9", Some("ep1"), None, &[r(1), r(2), stale, r(5)]);
        first.data.as_mut().unwrap().insert("msg_bad".into(), "[]".into());
        let second = segment(
            "a",
            "ep1-deliveries-10",
            Some("ep1"),
            None,
            &[newer.clone(), r(3), r(4)],
        );
        let all = newest_first_from_configmaps(&[second, first], 10);
        let ids: Vec<String> = all.iter().map(|x| x.id.clone()).collect();
        assert_eq!(ids, [5, 4, 3, 2, 1].map(|n| r(n).id));
        assert_eq!(all[3], newer);
        assert_eq!(all[2], r(3));
        assert_eq!(newest_first_from_configmaps(&[], 10), []);
        assert_eq!(
            log_selector(),
            "app.kubernetes.io/managed-by=capy-webhooks,app.kubernetes.io/component=delivery-log"
        );
    }
}
