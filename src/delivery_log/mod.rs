//! The delivery log: a durable, bounded record of every endpoint's deliveries, kept in ConfigMaps.
//!
//! Shared by the dispatcher (the single writer of each endpoint's log) and the REST facade (which
//! reads it), so it sits below both and imports neither.
//!
//! # Storage
//! Each endpoint has zero or more *segments*: ConfigMaps `<endpoint>-deliveries-<seq>` in the
//! endpoint's namespace, labelled with [`MANAGED_BY_LABEL`](crate::resources::MANAGED_BY_LABEL),
//! [`COMPONENT_LABEL`](crate::resources::COMPONENT_LABEL)`=`[`COMPONENT`],
//! [`ENDPOINT_LABEL`](crate::resources::ENDPOINT_LABEL) and
//! [`ORGANIZATION_LABEL`](crate::resources::ORGANIZATION_LABEL), with a non-controller owner reference to the
//! endpoint so that deleting it garbage-collects its log. `data` maps a delivery id to the
//! record's compact JSON ([`DeliveryRecord::to_stored`]).
//!
//! # Writing: a journal with group commit
//! The dispatcher keeps an [`EndpointLog`] (the in-memory image, pure) per endpoint and changes it
//! with [`EndpointLog::insert`] and [`EndpointLog::update`]. [`EndpointLog::take_writes`] turns
//! everything changed since the previous call into creates of new segments holding the current
//! version of each changed record, then deletes of the oldest segments that hold no live version;
//! [`apply`] sends them. A segment is never patched: the API server's cost of a write follows what
//! changed, not what a segment holds. A record's copy in the newest segment wins when the log is
//! read back. If applying fails, [`EndpointLog::restore`] hands the batch back so the next batch
//! writes it again.
//!
//! # Bounds
//! A batch's new segments hold at most [`LogConfig::segment_bytes`] each. The live records may take
//! half of [`LogConfig::max_segments`] × `segment_bytes` (pending ones counted with
//! [`GROWTH_RESERVE`] bytes for the fields their attempts fill in; [`LogFull`] beyond); once more
//! than `max_segments / 2` segments exist, batches compact the oldest away. Finished records beyond
//! the newest [`LogConfig::max_finished`] are pruned (their copies go with their segments); pending
//! ones never are. A record stays below [`HARD_SEGMENT_BYTES`] (under the 1 MiB object limit)
//! whatever updates do: an update that would cross it has its `last_error` shortened.

mod image;
mod record;
mod store;

pub use image::{EndpointLog, LogConfig, LogFull, PendingWrites, SegmentSummary, SegmentWrite};
pub use record::{DeliveryRecord, DeliveryState, MAX_ERROR_CHARS, new_delivery_id, truncate_error};
pub use store::{
    apply, apply_writes, endpoint_of, group_by_endpoint, load_all, log_selector, newest_first_from_configmaps,
    read_endpoint,
};

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::resources::{COMPONENT_LABEL, ENDPOINT_LABEL, MANAGED_BY, MANAGED_BY_LABEL, ORGANIZATION_LABEL};

/// Labels of every segment of `endpoint`'s log.
pub fn segment_labels(endpoint: &str, organization_id: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (COMPONENT_LABEL.to_string(), COMPONENT.to_string()),
        (ENDPOINT_LABEL.to_string(), endpoint_label_value(endpoint)),
        (ORGANIZATION_LABEL.to_string(), organization_id.to_string()),
    ])
}

/// [`COMPONENT_LABEL`](crate::resources::COMPONENT_LABEL) value of delivery-log ConfigMaps.
pub const COMPONENT: &str = "delivery-log";
/// Field manager of every write to the delivery log.
pub const FIELD_MANAGER: &str = "capy-webhooks-dispatcher";
/// Largest record accepted (key plus stored form); a larger one is refused with [`LogFull`].
pub const MAX_RECORD_BYTES: usize = 512 * 1024;
/// Largest [`LogConfig::segment_bytes`] honoured; larger settings are clamped to it.
pub const MAX_SEGMENT_BYTES: usize = 512 * 1024;
/// Hard ceiling of one record (key plus stored form) after updates, below the API server's 1 MiB
/// object limit.
pub const HARD_SEGMENT_BYTES: usize = 1_000_000;
/// Bytes reserved per pending record for the fields its attempts fill in (`attempts`,
/// `delivered_at`, `response_status`, a short `last_error`, ...), so that the capacity check
/// holds once they finish.
pub const GROWTH_RESERVE: usize = 128;

/// Infix between the endpoint name and the sequence number of a segment's name.
const SEGMENT_INFIX: &str = "-deliveries-";
/// Longest Kubernetes object name (DNS-1123 subdomain).
const MAX_NAME_LENGTH: usize = 253;
/// Longest label value.
const MAX_LABEL_VALUE_LENGTH: usize = 63;
/// Digits of the largest `u64`: room kept for the sequence number.
const MAX_SEQ_DIGITS: usize = 20;

/// First 8 hex digits of the SHA-256 of `s`: tells apart names that were shortened alike.
fn short_hash(s: &str) -> String {
    Sha256::digest(s.as_bytes())[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `name` if it is at most `max` characters, else a prefix of it and a hash of the whole, within
/// `max` characters. Keeps DNS-1123 validity: the prefix never ends in `-` or `.`.
fn shorten(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_string();
    }
    let hash = short_hash(name);
    // Names are ASCII (DNS-1123), so byte and character positions agree; stay safe regardless.
    let mut cut = max - hash.len() - 1;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    let prefix = name[..cut].trim_end_matches(['-', '.']);
    format!("{prefix}-{hash}")
}

/// Name of segment `seq` of `endpoint`'s log; a valid object name (at most 253 characters) for
/// every valid endpoint name.
pub fn segment_name(endpoint: &str, seq: u64) -> String {
    let base = shorten(endpoint, MAX_NAME_LENGTH - SEGMENT_INFIX.len() - MAX_SEQ_DIGITS);
    format!("{base}{SEGMENT_INFIX}{seq}")
}

/// The sequence number in a segment's name, if it has the form `<...>-deliveries-<seq>`.
pub fn segment_seq(name: &str) -> Option<u64> {
    let (_, seq) = name.rsplit_once(SEGMENT_INFIX)?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    seq.parse().ok()
}

/// The [`ENDPOINT_LABEL`](crate::resources::ENDPOINT_LABEL) value of an endpoint's segments: its name, shortened with a hash when it
/// is longer than a label value may be (CR names may have 253 characters, label values 63).
pub fn endpoint_label_value(endpoint: &str) -> String {
    shorten(endpoint, MAX_LABEL_VALUE_LENGTH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_stay_valid_for_long_endpoint_names() {
        assert_eq!(segment_name("ep1", 3), "ep1-deliveries-3");
        assert_eq!(segment_seq("ep1-deliveries-3"), Some(3));
        assert_eq!(segment_seq("a-deliveries-b-deliveries-12"), Some(12));
        assert_eq!(segment_seq("ep1-deliveries-"), None);
        assert_eq!(segment_seq("ep1-deliveries-x1"), None);
        assert_eq!(segment_seq("ep1"), None);

        let long = format!("{}.{}", "a".repeat(200), "b-".repeat(26))
            .trim_end_matches('-')
            .to_string();
        assert_eq!(long.len(), 252);
        let name = segment_name(&long, u64::MAX);
        assert!(name.len() <= 253, "{} chars", name.len());
        assert_eq!(segment_seq(&name), Some(u64::MAX));
        assert!(!name.contains("-.") && !name.contains(".-") && !name.contains("--"));
        let other = segment_name(&format!("{}x", &long[..251]), 1);
        assert_ne!(segment_name(&long, 1), other);

        let label = endpoint_label_value(&long);
        assert!(label.len() <= 63 && label.starts_with("aaa"));
        assert!(label.bytes().last().unwrap().is_ascii_alphanumeric());
        assert_eq!(endpoint_label_value("ep1"), "ep1");
        let sixty_three = "e".repeat(63);
        assert_eq!(endpoint_label_value(&sixty_three), sixty_three);
    }
}
