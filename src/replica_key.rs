//! How replicas authenticate to each other on the internal work route ([`crate::forwarder`]):
//! never with the producers' ingest token (a producer must not be able to act as a replica), but
//! with an HMAC-SHA256 over the request (method, path, a timestamp, body) keyed by Secret
//! [`REPLICA_KEY_SECRET`] in the home namespace, which only the operator reads. The receiver
//! recomputes it, compares in constant time and refuses timestamps more than
//! [`MAX_SKEW_SECS`] away from its clock (a captured request cannot be replayed later).

use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use warp::http::HeaderMap;

/// Secret (home namespace) holding the replicas' shared key, made on first start.
pub const REPLICA_KEY_SECRET: &str = "capy-webhooks-replica-key";
/// Header with the request's MAC, lower-case hex.
pub const SIGNATURE_HEADER: &str = "x-capy-webhooks-signature";
/// Header with the request's time, Unix seconds.
pub const TIMESTAMP_HEADER: &str = "x-capy-webhooks-timestamp";
/// Largest accepted distance, in seconds, between a request's timestamp and the receiver's clock.
pub const MAX_SKEW_SECS: i64 = 60;

/// Why a request is not from a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// No (or a malformed) signature or timestamp header.
    #[error("missing or malformed replica signature")]
    Missing,
    /// The timestamp is too far from now.
    #[error("stale replica signature")]
    Stale,
    /// The MAC does not match.
    #[error("invalid replica signature")]
    Invalid,
}

/// The replicas' shared key. Cheap to clone; never printed.
#[derive(Clone)]
pub struct ReplicaKey(Arc<[u8; 32]>);

impl std::fmt::Debug for ReplicaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicaKey(<redacted>)")
    }
}

impl ReplicaKey {
    /// A key from its bytes.
    pub fn new(key: [u8; 32]) -> Self {
        Self(Arc::new(key))
    }

    /// Reads the key from [`REPLICA_KEY_SECRET`] in `home_namespace`, creating it on first use.
    pub async fn load_or_create(client: &kube::Client, home_namespace: &str) -> anyhow::Result<Self> {
        let (key, _) =
            crate::operator_keys::load_or_create(client, home_namespace, REPLICA_KEY_SECRET, Default::default())
                .await?;
        Ok(Self::new(key))
    }

    fn mac(&self, method: &str, path: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0[..]).expect("HMAC takes any key length");
        // Method, path and timestamp hold no newline; the body comes last, so the split is unique.
        mac.update(format!("{method}\n{path}\n{timestamp}\n").as_bytes());
        mac.update(body);
        mac.finalize().into_bytes().into()
    }

    /// The two headers that authenticate a request made at `now` (Unix seconds).
    pub fn sign(&self, method: &str, path: &str, now: i64, body: &[u8]) -> [(&'static str, String); 2] {
        let mac = self.mac(method, path, now, body);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        [(SIGNATURE_HEADER, hex), (TIMESTAMP_HEADER, now.to_string())]
    }

    /// Checks only that the headers are there and fresh: cheap, before a body is read.
    pub fn precheck(headers: &HeaderMap, now: i64) -> Result<(i64, [u8; 32]), Refused> {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let timestamp: i64 = text(TIMESTAMP_HEADER)
            .and_then(|t| t.parse().ok())
            .ok_or(Refused::Missing)?;
        let signature = text(SIGNATURE_HEADER).and_then(parse_hex).ok_or(Refused::Missing)?;
        if timestamp.abs_diff(now) > MAX_SKEW_SECS.unsigned_abs() {
            return Err(Refused::Stale);
        }
        Ok((timestamp, signature))
    }

    /// Whether `headers` authenticate this request (at `now`, Unix seconds) as a replica's.
    pub fn verify(&self, method: &str, path: &str, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), Refused> {
        let (timestamp, presented) = Self::precheck(headers, now)?;
        let expected = self.mac(method, path, timestamp, body);
        if bool::from(expected.ct_eq(&presented)) {
            Ok(())
        } else {
            Err(Refused::Invalid)
        }
    }
}

fn parse_hex(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// Now, in Unix seconds.
pub fn unix_now() -> i64 {
    jiff::Timestamp::now().as_second()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/internal/v1/work";

    fn headers(signed: [(&'static str, String); 2]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in signed {
            h.insert(name, value.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_signed_request_verifies() {
        let key = ReplicaKey::new([7; 32]);
        let h = headers(key.sign("POST", PATH, 1_000, b"{\"op\":\"x\"}"));
        assert_eq!(key.verify("POST", PATH, &h, b"{\"op\":\"x\"}", 1_000), Ok(()));
        assert_eq!(key.verify("POST", PATH, &h, b"{\"op\":\"x\"}", 1_059), Ok(()));
    }

    #[test]
    fn another_key_does_not_verify() {
        let h = headers(ReplicaKey::new([1; 32]).sign("POST", PATH, 1_000, b"{}"));
        assert_eq!(
            ReplicaKey::new([2; 32]).verify("POST", PATH, &h, b"{}", 1_000),
            Err(Refused::Invalid)
        );
    }

    #[test]
    fn stale_or_future_timestamps_are_refused() {
        let key = ReplicaKey::new([7; 32]);
        let h = headers(key.sign("POST", PATH, 1_000, b"{}"));
        assert_eq!(key.verify("POST", PATH, &h, b"{}", 1_061), Err(Refused::Stale));
        assert_eq!(key.verify("POST", PATH, &h, b"{}", 939), Err(Refused::Stale));
    }

    #[test]
    fn a_tampered_body_path_method_or_timestamp_is_refused() {
        let key = ReplicaKey::new([7; 32]);
        let h = headers(key.sign("POST", PATH, 1_000, b"{\"limit\":1}"));
        assert_eq!(
            key.verify("POST", PATH, &h, b"{\"limit\":9}", 1_000),
            Err(Refused::Invalid)
        );
        assert_eq!(
            key.verify("POST", "/v1/other", &h, b"{\"limit\":1}", 1_000),
            Err(Refused::Invalid)
        );
        assert_eq!(
            key.verify("PUT", PATH, &h, b"{\"limit\":1}", 1_000),
            Err(Refused::Invalid)
        );
        let mut moved = h.clone();
        moved.insert(TIMESTAMP_HEADER, "1001".parse().unwrap());
        assert_eq!(
            key.verify("POST", PATH, &moved, b"{\"limit\":1}", 1_000),
            Err(Refused::Invalid)
        );
    }

    #[test]
    fn missing_or_malformed_headers_are_refused() {
        let key = ReplicaKey::new([7; 32]);
        assert_eq!(
            key.verify("POST", PATH, &HeaderMap::new(), b"{}", 1_000),
            Err(Refused::Missing)
        );
        let mut h = headers(key.sign("POST", PATH, 1_000, b"{}"));
        h.insert(SIGNATURE_HEADER, "zz".parse().unwrap());
        assert_eq!(key.verify("POST", PATH, &h, b"{}", 1_000), Err(Refused::Missing));
        let mut bearer_only = HeaderMap::new();
        bearer_only.insert("authorization", "Bearer test-ingest-token-0123456789".parse().unwrap());
        assert_eq!(
            key.verify("POST", PATH, &bearer_only, b"{}", 1_000),
            Err(Refused::Missing)
        );
    }
}
