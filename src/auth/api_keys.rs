//! API keys: `capy_live_` + 40 base62 characters, stored as one Secret per key that holds only the
//! key's SHA-256 hash, served from a watch-backed in-memory index.
//!
//! The pure functions (key and id generation, hashing, Secret <-> record) carry the logic; the
//! async functions at the bottom are the Kubernetes edges (the `api-key` CLI subcommands and the
//! index's watch).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use rand::TryRngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{info, warn};

use crate::resources::{MANAGED_BY, MANAGED_BY_LABEL, ORGANIZATION_LABEL};

/// Field manager of API-key Secrets (created by the `api-key` subcommand and by tests).
pub const FIELD_MANAGER: &str = "capy-webhooks-api-keys";
/// Prefix of every API key.
pub const KEY_PREFIX: &str = "capy_live_";
/// Number of random base62 characters after [`KEY_PREFIX`] in a generated key.
pub const KEY_RANDOM_CHARS: usize = 40;
/// Fewest base62 characters after the prefix for a string to look like a key.
pub const MIN_KEY_RANDOM_CHARS: usize = 32;
/// Most base62 characters after the prefix for a string to look like a key.
pub const MAX_KEY_RANDOM_CHARS: usize = 128;
/// Prefix of the name of every API-key Secret; the rest is the key id.
pub const SECRET_NAME_PREFIX: &str = "capy-api-key-";
/// Label marking a Secret as an API key.
pub const API_KEY_LABEL: &str = "webhooks.capydb.io/api-key";
/// Label selector matching every API-key Secret.
pub const API_KEY_SELECTOR: &str = "webhooks.capydb.io/api-key=true";
/// Secret data key: lowercase hex SHA-256 of the key.
pub const HASH_KEY: &str = "sha256";
/// Secret data key: the organization the key belongs to.
pub const ORGANIZATION_KEY: &str = "organization-id";
/// Secret data key: the project the key is limited to (absent for organization-wide keys).
pub const PROJECT_KEY: &str = "project-id";
/// Secret data key: a human-readable name of the key.
pub const NAME_KEY: &str = "name";
/// Secret data key: when the key was created, RFC 3339 UTC.
pub const CREATED_AT_KEY: &str = "created-at";
/// Length of a key id.
pub const KEY_ID_LENGTH: usize = crate::ids::ID_LENGTH;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn os_random(buf: &mut [u8]) {
    rand::rngs::OsRng
        .try_fill_bytes(buf)
        .expect("the OS random number generator works");
}

/// A new API key from the OS CSPRNG: [`KEY_PREFIX`] + [`KEY_RANDOM_CHARS`] base62 characters.
/// Rejection sampling keeps every character uniform.
pub fn generate_key() -> String {
    let mut key = String::with_capacity(KEY_PREFIX.len() + KEY_RANDOM_CHARS);
    key.push_str(KEY_PREFIX);
    let mut buf = [0u8; 64];
    while key.len() < KEY_PREFIX.len() + KEY_RANDOM_CHARS {
        os_random(&mut buf);
        // 248 = 4 * 62: bytes at or above it would favour the first 8 characters.
        for &byte in buf.iter().filter(|&&b| b < 248) {
            if key.len() == KEY_PREFIX.len() + KEY_RANDOM_CHARS {
                break;
            }
            key.push(char::from(BASE62[usize::from(byte % 62)]));
        }
    }
    key
}

/// Lowercase hex SHA-256 of a key: what is stored and indexed instead of the key.
pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `value` has the shape of an API key: the prefix, then 32 to 128 base62 characters.
pub fn looks_like_key(value: &str) -> bool {
    value.strip_prefix(KEY_PREFIX).is_some_and(|rest| {
        (MIN_KEY_RANDOM_CHARS..=MAX_KEY_RANDOM_CHARS).contains(&rest.len())
            && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

fn is_sha256_hex(value: &str) -> bool {
    value.len() == 64 && value.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `id` has the shape of a key id.
pub fn is_valid_key_id(id: &str) -> bool {
    crate::ids::is_valid_id(id)
}

/// Name of the Secret of the key with this id.
pub fn secret_name(id: &str) -> String {
    format!("{SECRET_NAME_PREFIX}{id}")
}

/// The key id of an API-key Secret, from its name.
fn key_id_of(secret: &Secret) -> Option<&str> {
    let id = secret.metadata.name.as_deref()?.strip_prefix(SECRET_NAME_PREFIX)?;
    is_valid_key_id(id).then_some(id)
}

/// What is stored about one API key. The hash is not a secret, but it is kept out of `Display`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyRecord {
    /// Public id of the key; its Secret is `capy-api-key-<id>`.
    pub id: String,
    /// The organization the key belongs to.
    pub organization_id: String,
    /// The project the key is limited to; `None` for an organization-wide key.
    pub project_id: Option<String>,
    /// Human-readable name (may be empty).
    pub name: String,
    /// When the key was created.
    pub created_at: Timestamp,
    /// Lowercase hex SHA-256 of the key.
    pub hash: String,
}

impl fmt::Display for ApiKeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} organization={}", self.id, self.organization_id)?;
        if let Some(project) = &self.project_id {
            write!(f, " project={project}")?;
        }
        write!(f, " name={:?} created-at={}", self.name, self.created_at)
    }
}

/// The Secret storing `record` in `namespace`. It holds the key's hash, never the key.
pub fn secret_for_record(record: &ApiKeyRecord, namespace: &str) -> Secret {
    let mut data = BTreeMap::from([
        (HASH_KEY.to_string(), ByteString(record.hash.clone().into_bytes())),
        (
            ORGANIZATION_KEY.to_string(),
            ByteString(record.organization_id.clone().into_bytes()),
        ),
        (NAME_KEY.to_string(), ByteString(record.name.clone().into_bytes())),
        (
            CREATED_AT_KEY.to_string(),
            ByteString(record.created_at.to_string().into_bytes()),
        ),
    ]);
    if let Some(project) = &record.project_id {
        data.insert(PROJECT_KEY.to_string(), ByteString(project.clone().into_bytes()));
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(&record.id)),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                (API_KEY_LABEL.to_string(), "true".to_string()),
                (ORGANIZATION_LABEL.to_string(), record.organization_id.clone()),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(data),
        ..Secret::default()
    }
}

/// Reads an API-key Secret. `None` when it is not a well-formed one, or when it is being deleted
/// (a key stops working as soon as its deletion starts).
pub fn record_from_secret(secret: &Secret) -> Option<ApiKeyRecord> {
    if secret.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let id = key_id_of(secret)?;
    let data = secret.data.as_ref()?;
    let text = |key: &str| data.get(key).and_then(|value| std::str::from_utf8(&value.0).ok());
    let hash = text(HASH_KEY).filter(|hash| is_sha256_hex(hash))?;
    let organization_id = text(ORGANIZATION_KEY).filter(|org| !org.is_empty())?;
    let created_at = text(CREATED_AT_KEY)?.parse::<Timestamp>().ok()?;
    Some(ApiKeyRecord {
        id: id.to_string(),
        organization_id: organization_id.to_string(),
        project_id: text(PROJECT_KEY).filter(|p| !p.is_empty()).map(str::to_string),
        name: text(NAME_KEY).unwrap_or_default().to_string(),
        created_at,
        hash: hash.to_string(),
    })
}

/// Keys by hash, as served to requests.
type KeysByHash = HashMap<String, ApiKeyRecord>;

struct IndexInner {
    keys: RwLock<KeysByHash>,
    /// Records of a relist in progress (between `Init` and `InitDone`).
    relist: Mutex<Option<KeysByHash>>,
    ready: tokio::sync::watch::Sender<bool>,
}

/// Watch-backed index of API keys by hash, so that a request never calls the API server.
/// Cheap to clone; all clones share the index. Fill it with [`ApiKeyIndex::run`].
#[derive(Clone)]
pub struct ApiKeyIndex {
    inner: Arc<IndexInner>,
}

impl Default for ApiKeyIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ApiKeyIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyIndex")
            .field("keys", &self.len())
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl ApiKeyIndex {
    /// An empty index, not ready.
    pub fn new() -> Self {
        ApiKeyIndex {
            inner: Arc::new(IndexInner {
                keys: RwLock::new(HashMap::new()),
                relist: Mutex::new(None),
                ready: tokio::sync::watch::Sender::new(false),
            }),
        }
    }

    /// Whether the first full list of keys has been loaded.
    pub fn is_ready(&self) -> bool {
        *self.inner.ready.borrow()
    }

    /// Waits until the first full list of keys has been loaded.
    pub async fn wait_ready(&self) {
        let mut ready = self.inner.ready.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = ready.wait_for(|ready| *ready).await;
    }

    /// Number of keys served.
    pub fn len(&self) -> usize {
        self.inner.keys.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether no key is served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The record of `key`, if it is a known key. Hashes the key, looks the hash up, and compares
    /// the stored hash in constant time before answering.
    pub fn lookup(&self, key: &str) -> Option<ApiKeyRecord> {
        let hash = hash_key(key);
        let keys = self.inner.keys.read().unwrap_or_else(PoisonError::into_inner);
        let record = keys.get(&hash)?;
        bool::from(record.hash.as_bytes().ct_eq(hash.as_bytes())).then(|| record.clone())
    }

    /// Applies one watcher event to the index. [`ApiKeyIndex::run`] feeds it; public so tests can
    /// feed synthetic events.
    pub fn apply_event(&self, event: Event<Secret>) {
        match event {
            Event::Apply(secret) => {
                let mut keys = self.inner.keys.write().unwrap_or_else(PoisonError::into_inner);
                upsert(&mut keys, &secret);
            }
            Event::Delete(secret) => {
                let mut keys = self.inner.keys.write().unwrap_or_else(PoisonError::into_inner);
                remove(&mut keys, &secret);
            }
            Event::Init => {
                *self.inner.relist.lock().unwrap_or_else(PoisonError::into_inner) = Some(HashMap::new());
            }
            Event::InitApply(secret) => {
                let mut relist = self.inner.relist.lock().unwrap_or_else(PoisonError::into_inner);
                upsert(relist.get_or_insert_with(HashMap::new), &secret);
            }
            Event::InitDone => {
                let relist = self.inner.relist.lock().unwrap_or_else(PoisonError::into_inner).take();
                let count = {
                    let mut keys = self.inner.keys.write().unwrap_or_else(PoisonError::into_inner);
                    *keys = relist.unwrap_or_default();
                    keys.len()
                };
                self.inner.ready.send_replace(true);
                info!(keys = count, "API keys loaded");
            }
        }
    }

    /// Keeps the index in step with the API-key Secrets of `namespace`, forever. Watch errors are
    /// logged and retried with backoff; the last known keys keep being served meanwhile.
    pub async fn run(self, client: Client, namespace: String) {
        let api: Api<Secret> = Api::namespaced(client, &namespace);
        let config = watcher::Config::default().labels(API_KEY_SELECTOR);
        let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => self.apply_event(event),
                Err(error) => warn!(%error, namespace, "watching API keys failed; retrying"),
            }
        }
    }
}

/// Replaces whatever the index holds for this Secret with its current record (if well formed).
fn upsert(keys: &mut KeysByHash, secret: &Secret) {
    remove(keys, secret);
    if let Some(record) = record_from_secret(secret) {
        keys.insert(record.hash.clone(), record);
    }
}

fn remove(keys: &mut KeysByHash, secret: &Secret) {
    if let Some(id) = key_id_of(secret) {
        keys.retain(|_, record| record.id != id);
    }
}

/// Creates a key for `org` (limited to `project` when given). Returns its record and the key,
/// which exists nowhere else afterwards: print it once.
pub async fn create_key(
    client: &Client,
    namespace: &str,
    org: &str,
    project: Option<&str>,
    name: Option<&str>,
) -> Result<(ApiKeyRecord, String), kube::Error> {
    let key = generate_key();
    let now = Timestamp::now();
    let record = ApiKeyRecord {
        id: crate::ids::time_sortable_id(now),
        organization_id: org.to_string(),
        project_id: project.filter(|p| !p.is_empty()).map(str::to_string),
        name: name.unwrap_or_default().to_string(),
        created_at: Timestamp::from_second(now.as_second()).unwrap_or(now),
        hash: hash_key(&key),
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    api.create(&params, &secret_for_record(&record, namespace)).await?;
    Ok((record, key))
}

/// The keys of `org`, oldest first.
pub async fn list_keys(client: &Client, namespace: &str, org: &str) -> Result<Vec<ApiKeyRecord>, kube::Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let selector = format!("{API_KEY_SELECTOR},{ORGANIZATION_LABEL}={org}");
    let secrets = api.list(&ListParams::default().labels(&selector)).await?;
    let mut records: Vec<ApiKeyRecord> = secrets
        .items
        .iter()
        .filter_map(record_from_secret)
        .filter(|record| record.organization_id == org)
        .collect();
    records.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(records)
}

/// Revokes the key with this id (or Secret name) by deleting its Secret. Returns whether it
/// existed. Requests stop accepting the key as soon as the index sees the deletion.
pub async fn revoke_key(client: &Client, namespace: &str, id: &str) -> Result<bool, kube::Error> {
    let id = id.strip_prefix(SECRET_NAME_PREFIX).unwrap_or(id);
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match api.delete(&secret_name(id), &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    fn record(key: &str, org: &str) -> ApiKeyRecord {
        ApiKeyRecord {
            id: crate::ids::time_sortable_id(Timestamp::now()),
            organization_id: org.to_string(),
            project_id: None,
            name: "deploy bot".to_string(),
            created_at: "2025-03-01T12:00:00Z".parse().unwrap(),
            hash: hash_key(key),
        }
    }

    #[test]
    fn generated_keys_have_the_documented_format() {
        let key = generate_key();
        assert!(key.starts_with(KEY_PREFIX));
        assert_eq!(key.len(), KEY_PREFIX.len() + KEY_RANDOM_CHARS);
        assert!(key[KEY_PREFIX.len()..].bytes().all(|b| BASE62.contains(&b)));
        assert!(looks_like_key(&key));
        assert_ne!(generate_key(), key);
    }

    #[test]
    fn generated_keys_use_the_whole_base62_alphabet() {
        let seen: HashSet<char> = (0..200)
            .flat_map(|_| generate_key()[KEY_PREFIX.len()..].chars().collect::<Vec<_>>())
            .collect();
        // 8,000 uniform draws from 62 characters miss one with probability ~62 * e^-129.
        assert_eq!(seen.len(), 62);
    }

    #[test]
    fn hash_is_lowercase_hex_sha256() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_sha256_hex(&hash_key(&generate_key())));
    }

    #[test]
    fn recognises_key_shapes() {
        assert!(looks_like_key(&format!("{KEY_PREFIX}{}", "a".repeat(32))));
        assert!(!looks_like_key(&format!("{KEY_PREFIX}{}", "a".repeat(31))));
        assert!(!looks_like_key(&format!("{KEY_PREFIX}{}", "a".repeat(129))));
        assert!(!looks_like_key(&format!("{KEY_PREFIX}{}-", "a".repeat(40))));
        assert!(!looks_like_key(&format!("capy_test_{}", "a".repeat(40))));
        assert!(!looks_like_key("eyJhbGciOi.eyJzdWIi.c2ln"));
    }

    #[test]
    fn ids_are_time_sortable_dns_labels() {
        let t0: Timestamp = "2025-03-01T12:00:00.000Z".parse().unwrap();
        let t1: Timestamp = "2025-03-01T12:00:00.002Z".parse().unwrap();
        let a = crate::ids::id_at(t0, [0xff; 10]);
        let b = crate::ids::id_at(t1, [0x00; 10]);
        assert!(a < b, "{a} < {b}");
        assert!(crate::ids::id_at(t0, [0; 10]) < crate::ids::id_at(t0 + std::time::Duration::from_millis(1), [0; 10]));

        let (first, second) = (crate::ids::id_at(t0, [7; 10]), crate::ids::id_at(t1, [7; 10]));
        for id in [&first, &second] {
            assert!(is_valid_key_id(id));
            let name = secret_name(id);
            assert!(name.len() <= 63);
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            );
            assert!(
                name.as_bytes()[0].is_ascii_alphanumeric() && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
            );
        }
        let now = Timestamp::now();
        assert_ne!(crate::ids::time_sortable_id(now), crate::ids::time_sortable_id(now));
    }

    #[test]
    fn records_round_trip_through_secrets() {
        let key = generate_key();
        let mut rec = record(&key, "org_1");
        let secret = secret_for_record(&rec, "capy");
        assert_eq!(record_from_secret(&secret), Some(rec.clone()));
        assert_eq!(secret.metadata.name, Some(format!("capy-api-key-{}", rec.id)));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("capy"));
        assert_eq!(secret.type_.as_deref(), Some("Opaque"));
        let labels = secret.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[MANAGED_BY_LABEL], "capy-webhooks");
        assert_eq!(labels[API_KEY_LABEL], "true");
        assert_eq!(labels[ORGANIZATION_LABEL], "org_1");
        let data = secret.data.as_ref().unwrap();
        assert_eq!(data[CREATED_AT_KEY].0, b"2025-03-01T12:00:00Z");
        assert!(!data.contains_key(PROJECT_KEY));

        rec.project_id = Some("proj_9".to_string());
        assert_eq!(record_from_secret(&secret_for_record(&rec, "capy")), Some(rec));
    }

    #[test]
    fn secrets_never_hold_the_key() {
        let key = generate_key();
        let secret = secret_for_record(&record(&key, "org_1"), "capy");
        let json = serde_json::to_string(&secret).unwrap();
        assert!(!json.contains(&key));
        assert!(!json.contains(&key[KEY_PREFIX.len()..]));
        for value in secret.data.unwrap().values() {
            assert!(!String::from_utf8_lossy(&value.0).contains(&key[KEY_PREFIX.len()..]));
        }
        assert!(!record(&key, "org_1").to_string().contains(&hash_key(&key)));
    }

    #[test]
    fn malformed_secrets_are_not_records() {
        let key = generate_key();
        let good = secret_for_record(&record(&key, "org_1"), "capy");
        let mut bad_name = good.clone();
        bad_name.metadata.name = Some("some-other-secret".into());
        let mut bad_hash = good.clone();
        bad_hash
            .data
            .as_mut()
            .unwrap()
            .insert(HASH_KEY.into(), ByteString(b"ABC".to_vec()));
        let mut no_org = good.clone();
        no_org.data.as_mut().unwrap().remove(ORGANIZATION_KEY);
        let mut deleting = good.clone();
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        for secret in [bad_name, bad_hash, no_org, deleting] {
            assert_eq!(record_from_secret(&secret), None);
        }
    }

    #[test]
    fn index_follows_apply_and_delete() {
        let index = ApiKeyIndex::new();
        let key = generate_key();
        let rec = record(&key, "org_1");
        assert_eq!(index.lookup(&key), None);
        index.apply_event(Event::Apply(secret_for_record(&rec, "capy")));
        assert_eq!(index.lookup(&key), Some(rec.clone()));
        assert_eq!(index.lookup(&generate_key()), None);

        // Rewriting a Secret to another hash drops the old one.
        let other_key = generate_key();
        let rewritten = ApiKeyRecord {
            hash: hash_key(&other_key),
            ..rec.clone()
        };
        index.apply_event(Event::Apply(secret_for_record(&rewritten, "capy")));
        assert_eq!(index.lookup(&key), None);
        assert_eq!(index.lookup(&other_key), Some(rewritten.clone()));

        index.apply_event(Event::Delete(secret_for_record(&rewritten, "capy")));
        assert_eq!(index.lookup(&other_key), None);
        assert!(index.is_empty());
    }

    #[tokio::test]
    async fn relist_replaces_the_whole_set_and_marks_ready() {
        let index = ApiKeyIndex::new();
        assert!(!index.is_ready());
        let (old, kept, new) = (generate_key(), generate_key(), generate_key());
        let (old_rec, kept_rec, new_rec) = (record(&old, "org_1"), record(&kept, "org_1"), record(&new, "org_2"));
        index.apply_event(Event::Apply(secret_for_record(&old_rec, "capy")));
        index.apply_event(Event::Apply(secret_for_record(&kept_rec, "capy")));

        index.apply_event(Event::Init);
        index.apply_event(Event::InitApply(secret_for_record(&kept_rec, "capy")));
        index.apply_event(Event::InitApply(secret_for_record(&new_rec, "capy")));
        // Until the relist is complete the previous set is served.
        assert_eq!(index.lookup(&old), Some(old_rec));
        assert_eq!(index.lookup(&new), None);
        index.apply_event(Event::InitDone);

        assert!(index.is_ready());
        tokio::time::timeout(std::time::Duration::from_secs(1), index.wait_ready())
            .await
            .unwrap();
        assert_eq!(index.lookup(&old), None);
        assert_eq!(index.lookup(&kept), Some(kept_rec));
        assert_eq!(index.lookup(&new), Some(new_rec));
        assert_eq!(index.len(), 2);
    }
}
