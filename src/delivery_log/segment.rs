//! The stored form of a segment: its entries (id → value) as lines `<id>\t<value>\n`,
//! deflate-compressed, in one `binaryData` value ([`JOURNAL_KEY`]).
//!
//! One value rather than one data key per entry, because every key of a ConfigMap costs twice
//! in etcd (the key and its `managedFields` entry) and its JSON value is escaped in transit;
//! compressed, because delivery records repeat their field names, endpoint and time prefixes. At a
//! fan-out of 10 that took a delivery from about 620 to about 170 bytes of etcd (`make bench`; see
//! the README, "Sizing"). Segments that hold their entries as separate data keys (written before
//! this format) are read as well.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Read;

use flate2::read::DeflateDecoder;
#[cfg(test)]
use flate2::write::DeflateEncoder;
use flate2::{Compress, Compression, FlushCompress, Status};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;

/// The `binaryData` key holding a segment's entries.
pub const JOURNAL_KEY: &str = "journal";

/// The `data` key holding a segment's floor: the lowest sequence number of its log that was
/// not yet known deleted when it was written. A segment below the highest floor of its log was
/// deleted by the operator (or is being): if it is there again, it is a replay, never read.
pub const FLOOR_KEY: &str = "floor";

/// A segment's floor ([`FLOOR_KEY`]); 0 for segments written before floors existed.
pub fn floor(cm: &ConfigMap) -> u64 {
    cm.data
        .as_ref()
        .and_then(|d| d.get(FLOOR_KEY))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Largest inflated size read back from one segment: a bound against a corrupt or hostile value
/// (writers stay far below it: a segment holds at most a few hundred KiB).
const MAX_INFLATED_BYTES: u64 = 16 * 1024 * 1024;

/// The packed form of `entries` (ids and values hold neither tabs nor newlines: ids are
/// ConfigMap keys, values compact JSON).
///
/// The lines are laid out in one buffer and compressed in one call, by a compressor kept per
/// thread: a new compressor allocates and zeroes a few hundred KiB of tables, and each write into
/// flate2's streaming writer zeroes its 32 KiB output buffer, which together cost more CPU than
/// the compression itself at a few records per segment (`make bench` profile).
pub fn pack(entries: &BTreeMap<String, String>) -> ByteString {
    let plain_len: usize = entries.iter().map(|(id, value)| id.len() + value.len() + 2).sum();
    let mut plain = Vec::with_capacity(plain_len);
    for (id, value) in entries {
        debug_assert!(!id.contains(['\t', '\n']) && !value.contains('\n'));
        plain.extend_from_slice(id.as_bytes());
        plain.push(b'\t');
        plain.extend_from_slice(value.as_bytes());
        plain.push(b'\n');
    }
    ByteString(deflate(&plain))
}

thread_local! {
    static COMPRESSOR: RefCell<Compress> = RefCell::new(Compress::new(Compression::fast(), false));
}

/// Raw deflate of `plain`, the same stream [`DeflateEncoder`] writes.
fn deflate(plain: &[u8]) -> Vec<u8> {
    COMPRESSOR.with_borrow_mut(|compressor| {
        compressor.reset();
        let mut out = Vec::with_capacity(plain.len() / 2 + 64);
        loop {
            let consumed = usize::try_from(compressor.total_in()).expect("fits in memory");
            let status = compressor
                .compress_vec(&plain[consumed..], &mut out, FlushCompress::Finish)
                .expect("deflating to a Vec cannot fail");
            if status == Status::StreamEnd {
                return out;
            }
            out.reserve(out.capacity().max(64));
        }
    })
}

/// Every entry a segment stores: its packed entries and any separate data keys. An unreadable
/// packed value is an error (the caller skips the segment's entries and says so).
pub fn entries(cm: &ConfigMap) -> Result<BTreeMap<String, String>, String> {
    let mut entries: BTreeMap<String, String> = cm.data.clone().unwrap_or_default();
    entries.remove(FLOOR_KEY);
    if let Some(packed) = cm.binary_data.as_ref().and_then(|b| b.get(JOURNAL_KEY)) {
        let mut text = String::new();
        DeflateDecoder::new(packed.0.as_slice())
            .take(MAX_INFLATED_BYTES)
            .read_to_string(&mut text)
            .map_err(|e| format!("unreadable packed entries: {e}"))?;
        for line in text.lines() {
            let (id, value) = line
                .split_once('\t')
                .ok_or_else(|| "a packed entry without a tab".to_string())?;
            entries.insert(id.to_string(), value.to_string());
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn packing_matches_the_streaming_encoder_and_reuses_the_compressor() {
        let made = |n: usize| -> BTreeMap<String, String> {
            (0..n)
                .map(|i| (format!("msg_{i:06}"), format!(r#"{{"e":"ep-{}","a":{i}}}"#, i % 7)))
                .collect()
        };
        // Large enough to need more output room than first reserved, and a small one after it.
        for n in [3000, 1, 0, 40] {
            let written = made(n);
            let mut encoder = DeflateEncoder::new(Vec::new(), Compression::fast());
            for (id, value) in &written {
                writeln!(encoder, "{id}\t{value}").unwrap();
            }
            let streamed = encoder.finish().unwrap();
            let packed = pack(&written);
            let cm = ConfigMap {
                binary_data: Some(BTreeMap::from([(JOURNAL_KEY.to_string(), packed)])),
                ..Default::default()
            };
            assert_eq!(entries_of(&cm), written, "{n} entries round trip");
            let mut inflated = String::new();
            DeflateDecoder::new(streamed.as_slice())
                .read_to_string(&mut inflated)
                .unwrap();
            let mut packed_text = String::new();
            DeflateDecoder::new(cm.binary_data.unwrap()[JOURNAL_KEY].0.as_slice())
                .read_to_string(&mut packed_text)
                .unwrap();
            assert_eq!(packed_text, inflated, "the same lines as the streaming encoder's");
        }
    }

    fn entries_of(cm: &ConfigMap) -> BTreeMap<String, String> {
        entries(cm).unwrap()
    }

    #[test]
    fn entries_round_trip_packed_and_compressed() {
        let written: BTreeMap<String, String> = (0..200)
            .map(|n| {
                (
                    format!("msg_01kbkz8g2v3m4n5p6q7r8s{n:04}"),
                    format!(r#"{{"e":"ep-01kbkz7xq2","v":"evt_01kbkz8g2v{n:014}","t":"database.created","s":"p","a":0,"m":8,"c":1764748800123,"n":0}}"#),
                )
            })
            .collect();
        let packed = pack(&written);
        let plain: usize = written.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(
            packed.0.len() * 4 < plain,
            "{} packed bytes for {plain}",
            packed.0.len()
        );
        let cm = ConfigMap {
            binary_data: Some(BTreeMap::from([(JOURNAL_KEY.to_string(), packed)])),
            data: Some(BTreeMap::from([("msg_separate".to_string(), "{}".to_string())])),
            ..Default::default()
        };
        let back = entries(&cm).unwrap();
        assert_eq!(back.len(), 201);
        assert_eq!(back["msg_separate"], "{}");
        assert!(written.iter().all(|(k, v)| &back[k] == v));
        assert!(!pack(&BTreeMap::new()).0.is_empty());
        assert!(entries(&ConfigMap::default()).unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_packed_value_is_an_error() {
        let cm = |bytes: Vec<u8>| ConfigMap {
            binary_data: Some(BTreeMap::from([(JOURNAL_KEY.to_string(), ByteString(bytes))])),
            ..Default::default()
        };
        assert!(entries(&cm(b"not deflate at all".to_vec())).is_err());
        let mut no_tab = BTreeMap::new();
        no_tab.insert("a".to_string(), "b".to_string());
        let packed = pack(&no_tab).0;
        assert_eq!(entries(&cm(packed)).unwrap()["a"], "b");
        // A line without a tab.
        let mut encoder = DeflateEncoder::new(Vec::new(), Compression::fast());
        encoder.write_all(b"msg_1 no tab\n").unwrap();
        assert!(entries(&cm(encoder.finish().unwrap())).is_err());
    }
}
