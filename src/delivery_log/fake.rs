//! A stand-in for the API server's ConfigMaps in the pure tests of the log: it applies writes
//! the way the real one does (a create of an existing name is a 409 followed by a merge patch, a
//! delete of a missing one a 404).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use super::image::{PendingWrites, SegmentWrite};
use super::journal_seq;

/// ConfigMap name → ConfigMap, as the API server would hold them.
#[derive(Default, Debug, Clone)]
pub(crate) struct FakeServer {
    pub(crate) objects: BTreeMap<String, ConfigMap>,
}

impl FakeServer {
    /// Applies writes in order, like `store::apply`; fails at write number `fail_at` (0-based),
    /// having applied the writes before it.
    pub(crate) fn apply(&mut self, writes: &PendingWrites, fail_at: Option<usize>) -> Result<(), ()> {
        self.apply_list(writes.writes(), fail_at)
    }

    /// Applies a list of writes in order; fails at write number `fail_at`, having applied those
    /// before it.
    pub(crate) fn apply_list(&mut self, writes: &[SegmentWrite], fail_at: Option<usize>) -> Result<(), ()> {
        for (i, write) in writes.iter().enumerate() {
            if fail_at == Some(i) {
                return Err(());
            }
            match write {
                SegmentWrite::Create(cm) => {
                    let name = cm.metadata.name.clone().unwrap();
                    match self.objects.get_mut(&name) {
                        // 409, then a merge patch of its data.
                        Some(existing) => {
                            let data = existing.data.get_or_insert_default();
                            data.extend(cm.data.clone().unwrap_or_default());
                            let binary = existing.binary_data.get_or_insert_default();
                            binary.extend(cm.binary_data.clone().unwrap_or_default());
                        }
                        None => {
                            self.objects.insert(name, cm.clone());
                        }
                    }
                }
                // A 404 is fine.
                SegmentWrite::Delete { name } => {
                    self.objects.remove(name);
                }
            }
        }
        Ok(())
    }

    pub(crate) fn configmaps(&self) -> Vec<ConfigMap> {
        self.objects.values().cloned().collect()
    }

    /// Names of the ConfigMaps, oldest sequence number first.
    pub(crate) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.objects.keys().cloned().collect();
        names.sort_by_key(|n| journal_seq(n));
        names
    }

    /// The entries a segment stores (packed or not).
    pub(crate) fn data(&self, name: &str) -> BTreeMap<String, String> {
        super::segment::entries(&self.objects[name]).unwrap()
    }
}
