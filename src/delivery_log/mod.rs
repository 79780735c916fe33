//! The delivery log: a durable, bounded record of every organization's deliveries and the events
//! they carry, kept in ConfigMaps.
//!
//! Shared by the dispatcher (the single writer of each organization's log) and the REST facade
//! (which reads it), so it sits below both and imports neither.
//!
//! # Storage
//! Each organization has, in each namespace where it has endpoints, zero or more *segments*:
//! ConfigMaps `<organization slug>-<hash>-journal-<seq>` ([`journal_segment_name`]), labelled
//! with [`MANAGED_BY_LABEL`](crate::resources::MANAGED_BY_LABEL),
//! [`COMPONENT_LABEL`](crate::resources::COMPONENT_LABEL)`=`[`COMPONENT`] and
//! [`ORGANIZATION_LABEL`](crate::resources::ORGANIZATION_LABEL). `data` maps an event id
//! (`evt_...`) to the event's payload, stored once however many endpoints it goes to, and a
//! delivery id (`msg_...`) to the delivery's small record ([`DeliveryRecord::to_stored`]).
//! Dispatch is partitioned by organization, so one writer fans an event out and stores it once.
//!
//! # Writing: a journal with group commit
//! The dispatcher keeps a [`DeliveryLog`] (the in-memory image, pure) per organization and
//! namespace, and changes it with [`DeliveryLog::insert_event`], [`DeliveryLog::insert`] and
//! [`DeliveryLog::update`]. [`DeliveryLog::take_writes`] turns everything changed since the
//! previous call into creates of new segments holding the current version of each changed entry,
//! then deletes of the oldest segments that hold no live version; [`apply`] sends them. A segment is
//! never patched: the API server's cost of a write follows what changed, not what a segment holds.
//! An entry's copy in the newest segment wins when the log is read back. If applying fails,
//! [`DeliveryLog::restore`] hands the batch back so the next batch writes it again.
//!
//! # Budget
//! Every byte written lands in the cluster's etcd: [`WriteBudget`] limits the bytes per second the
//! dispatcher writes, and new work is refused (ingest answers 503) while it is spent.
//!
//! # Bounds
//! A batch's new segments hold at most [`LogConfig::segment_bytes`] each. Each endpoint's
//! deliveries may take half of [`LogConfig::max_segments`] × `segment_bytes` (pending ones counted
//! with [`GROWTH_RESERVE`] bytes for the fields their attempts fill in; [`LogFull`] beyond); once
//! there are more segments than the live entries need, batches compact the oldest away. Each
//! endpoint's finished deliveries beyond the newest [`LogConfig::max_finished`] are pruned (their
//! copies go with their segments), and an event goes with the last delivery carrying it; pending
//! deliveries never are. A record stays below [`HARD_SEGMENT_BYTES`] (under the 1 MiB object
//! limit) whatever updates do: an update that would cross it has its `last_error` shortened.
//!
//! # The first format
//! Up to version 0.1 each endpoint had its own segments, `<endpoint>-deliveries-<seq>`, and every
//! record carried its own copy of the payload. Recovery reads them ([`DeliveryLog::from_configmaps`]),
//! the next batch writes their records in this format, and then deletes them.

mod budget;
#[cfg(test)]
mod fake;
mod image;
mod pipeline;
mod record;
mod segment;
mod store;
mod trust;

pub use budget::{TokenBucket, WriteBudget, parse_bytes};
pub use pipeline::{Started, WritePipeline};
pub use segment::{JOURNAL_KEY, entries as segment_entries, pack as pack_entries};

pub use image::{
    BACKLOG_FULL_ERROR, DELETE_BYTES, DeliveryLog, LogConfig, LogFull, PendingWrites, SegmentSummary, SegmentWrite,
    is_event_key,
};
pub use record::{DeliveryRecord, DeliveryState, MAX_ERROR_CHARS, new_delivery_id, new_event_id, truncate_error};
pub use store::{
    LogWatch, apply, apply_writes, foreign_segment_name, group_by_organization, is_name_taken, load_all,
    load_organizations_where, log_selector, read_organization,
};
pub use trust::{
    LOG_KEY_SECRET, LogKey, MAC_ANNOTATION, Rejection, endpoints_named_in, judge as judge_segment, load_or_create_key,
    sign_unsigned_segments,
};

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::resources::{COMPONENT_LABEL, MANAGED_BY, MANAGED_BY_LABEL, ORGANIZATION_LABEL};

/// Labels of every segment of an organization's log.
pub fn segment_labels(organization_id: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (COMPONENT_LABEL.to_string(), COMPONENT.to_string()),
        (ORGANIZATION_LABEL.to_string(), organization_id.to_string()),
    ])
}

/// Prefix of event ids, and so of the data keys holding payloads.
pub const EVENT_KEY_PREFIX: &str = "evt_";

/// [`COMPONENT_LABEL`](crate::resources::COMPONENT_LABEL) value of delivery-log ConfigMaps.
pub const COMPONENT: &str = "delivery-log";
/// Field manager of every write to the delivery log.
pub const FIELD_MANAGER: &str = "capy-webhooks-delivery-log";
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

/// Infix between the endpoint name and the sequence number of a first-format segment's name.
const LEGACY_INFIX: &str = "-deliveries-";
/// Infix between the organization's slug and the sequence number of a segment's name.
const JOURNAL_INFIX: &str = "-journal-";
/// Longest Kubernetes object name (DNS-1123 subdomain).
const MAX_NAME_LENGTH: usize = 253;
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

/// Name of segment `seq` of an organization's log: a DNS-1123 form of the organization id (cut
/// to fit) and a hash of the id itself (ids differing only in case or punctuation stay apart).
pub fn journal_segment_name(organization_id: &str, seq: u64) -> String {
    let mut slug = String::with_capacity(organization_id.len());
    for c in organization_id.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if !(c == '-' && slug.ends_with('-')) {
            slug.push(c);
        }
    }
    let slug = slug.trim_matches('-');
    let room = MAX_NAME_LENGTH - JOURNAL_INFIX.len() - MAX_SEQ_DIGITS - 9;
    let slug = slug[..slug.len().min(room)].trim_end_matches('-');
    let hash = short_hash(organization_id);
    if slug.is_empty() {
        format!("{hash}{JOURNAL_INFIX}{seq}")
    } else {
        format!("{slug}-{hash}{JOURNAL_INFIX}{seq}")
    }
}

fn seq_after(name: &str, infix: &str) -> Option<u64> {
    let (_, seq) = name.rsplit_once(infix)?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    seq.parse().ok()
}

/// The sequence number in a segment's name, if it has the form `<...>-journal-<seq>`.
pub fn journal_seq(name: &str) -> Option<u64> {
    seq_after(name, JOURNAL_INFIX)
}

/// The sequence number in a first-format segment's name (`<endpoint>-deliveries-<seq>`).
pub fn legacy_segment_seq(name: &str) -> Option<u64> {
    seq_after(name, LEGACY_INFIX)
}

/// Name of segment `seq` of an endpoint's log in the first format (for tests and fixtures).
pub fn legacy_segment_name(endpoint: &str, seq: u64) -> String {
    let base = shorten(endpoint, MAX_NAME_LENGTH - LEGACY_INFIX.len() - MAX_SEQ_DIGITS);
    format!("{base}{LEGACY_INFIX}{seq}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_are_valid_for_every_organization_id() {
        let name = journal_segment_name("org_demo", 3);
        assert!(name.starts_with("org-demo-") && name.ends_with("-journal-3"), "{name}");
        assert_eq!(journal_seq(&name), Some(3));
        assert_eq!(journal_seq("a-journal-b-journal-12"), Some(12));
        assert_eq!(journal_seq("x-journal-"), None);
        assert_eq!(journal_seq("x-journal-1a"), None);
        assert_eq!(journal_seq("ep1-deliveries-3"), None);
        assert_eq!(legacy_segment_seq("ep1-deliveries-3"), Some(3));
        assert_eq!(legacy_segment_seq(&name), None);
        assert_eq!(legacy_segment_name("ep1", 3), "ep1-deliveries-3");
        // Case and punctuation are folded in the slug, but the hash keeps ids apart.
        assert_ne!(journal_segment_name("Org_A", 1), journal_segment_name("org-a", 1));
        let dns1123 = |n: &str| {
            n.len() <= 253
                && n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && n.as_bytes()[0].is_ascii_alphanumeric()
                && !n.contains("--")
        };
        for org in ["org_demo", "A", "x.y_z-1", "_._", &"o".repeat(63), "Org__2AbC..d"] {
            let name = journal_segment_name(org, u64::MAX);
            assert!(dns1123(&name), "{name}");
            assert_eq!(journal_seq(&name), Some(u64::MAX));
        }
        let long = "e".repeat(252);
        let legacy = legacy_segment_name(&long, u64::MAX);
        assert!(legacy.len() <= 253);
        assert_eq!(legacy_segment_seq(&legacy), Some(u64::MAX));
    }
}
