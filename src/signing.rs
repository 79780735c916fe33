//! Standard Webhooks signing secrets, their rotation, and the signature itself.
//!
//! Pure domain logic: no Kubernetes types and no IO. The controller stores a [`KeyRing`] in a
//! Secret; the dispatcher signs with every secret the ring still honours.
//!
//! Two schemes: `hmac-sha256` (`whsec_` shared secrets, `v1,` signatures) and `ed25519`
//! (`whsk_` private keys that only the operator holds, `whpk_` public keys for receivers, `v1a,`
//! signatures), both over the same signed content `{id}.{timestamp}.{body}`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use jiff::Timestamp;
use rand::TryRngCore;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Prefix of every HMAC signing secret (the Standard Webhooks format).
pub const SECRET_PREFIX: &str = "whsec_";
/// Prefix of an ed25519 private key: base64 of its 32-byte seed and 32-byte public key.
pub const PRIVATE_KEY_PREFIX: &str = "whsk_";
/// Prefix of an ed25519 public key, what receivers verify `v1a` signatures with: base64 of 32 bytes.
pub const PUBLIC_KEY_PREFIX: &str = "whpk_";
/// Bytes of an ed25519 seed, and of a public key.
pub const ED25519_KEY_BYTES: usize = 32;

/// How an endpoint's deliveries are signed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum SignatureScheme {
    /// Standard Webhooks `v1`: HMAC-SHA256 with a shared `whsec_` secret.
    #[default]
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
    /// Standard Webhooks `v1a`: ed25519; receivers hold only the `whpk_` public key.
    #[serde(rename = "ed25519")]
    Ed25519,
}

impl SignatureScheme {
    /// The name used by the REST API and the CR.
    pub fn as_str(self) -> &'static str {
        match self {
            SignatureScheme::HmacSha256 => "hmac-sha256",
            SignatureScheme::Ed25519 => "ed25519",
        }
    }
}

/// Random bytes in a secret this operator generates.
pub const GENERATED_SECRET_BYTES: usize = 32;
/// Smallest key accepted when reading a secret back.
pub const MIN_SECRET_BYTES: usize = 24;
/// Largest key accepted when reading a secret back.
pub const MAX_SECRET_BYTES: usize = 64;
/// Previous secrets kept at most, however often the secret is rotated within a grace period.
pub const MAX_PREVIOUS_SECRETS: usize = 8;

/// A signing key: a `whsec_` HMAC secret or a `whsk_` ed25519 private key. `Debug` never shows it.
#[derive(Clone)]
pub struct SigningSecret {
    encoded: String,
    key: Key,
}

#[derive(Clone)]
enum Key {
    Hmac(Vec<u8>),
    Ed25519(Arc<Ed25519KeyPair>),
}

impl PartialEq for SigningSecret {
    fn eq(&self, other: &Self) -> bool {
        // The encoded form holds every byte of the key (and, for ed25519, its public half).
        self.encoded == other.encoded
    }
}

impl Eq for SigningSecret {}

/// Why a stored secret could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSecret {
    /// The value does not start with `whsec_`.
    #[error("signing secret does not start with {SECRET_PREFIX}")]
    MissingPrefix,
    /// The part after the prefix is not base64.
    #[error("signing secret is not valid base64")]
    NotBase64,
    /// The decoded key is too short or too long.
    #[error("signing secret key has {0} bytes, expected {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES}")]
    BadLength(usize),
    /// A `whsk_` key is not 64 bytes: a 32-byte seed followed by its own 32-byte public key.
    #[error("ed25519 private key is not a seed followed by its public key")]
    BadEd25519Key,
}

impl SigningSecret {
    /// A fresh HMAC secret of [`GENERATED_SECRET_BYTES`] bytes from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self::generate_with(SignatureScheme::HmacSha256)
    }

    /// A fresh key of `scheme`, from the operating system's CSPRNG.
    pub fn generate_with(scheme: SignatureScheme) -> Self {
        let mut key = vec![0u8; GENERATED_SECRET_BYTES];
        rand::rngs::OsRng
            .try_fill_bytes(&mut key)
            .expect("the OS random number generator works");
        match scheme {
            SignatureScheme::HmacSha256 => Self {
                encoded: format!("{SECRET_PREFIX}{}", BASE64.encode(&key)),
                key: Key::Hmac(key),
            },
            SignatureScheme::Ed25519 => {
                let pair = Ed25519KeyPair::from_seed_unchecked(&key).expect("any 32 bytes are an ed25519 seed");
                key.extend_from_slice(pair.public_key().as_ref());
                Self {
                    encoded: format!("{PRIVATE_KEY_PREFIX}{}", BASE64.encode(&key)),
                    key: Key::Ed25519(Arc::new(pair)),
                }
            }
        }
    }

    /// Parses a stored `whsec_...` or `whsk_...` value.
    pub fn parse(value: &str) -> Result<Self, InvalidSecret> {
        let value = value.trim();
        if let Some(b64) = value.strip_prefix(PRIVATE_KEY_PREFIX) {
            let key = BASE64.decode(b64).map_err(|_| InvalidSecret::NotBase64)?;
            if key.len() != 2 * ED25519_KEY_BYTES {
                return Err(InvalidSecret::BadEd25519Key);
            }
            let (seed, public) = key.split_at(ED25519_KEY_BYTES);
            let pair =
                Ed25519KeyPair::from_seed_and_public_key(seed, public).map_err(|_| InvalidSecret::BadEd25519Key)?;
            return Ok(Self {
                encoded: value.to_string(),
                key: Key::Ed25519(Arc::new(pair)),
            });
        }
        let b64 = value.strip_prefix(SECRET_PREFIX).ok_or(InvalidSecret::MissingPrefix)?;
        let key = BASE64.decode(b64).map_err(|_| InvalidSecret::NotBase64)?;
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&key.len()) {
            return Err(InvalidSecret::BadLength(key.len()));
        }
        Ok(Self {
            encoded: value.to_string(),
            key: Key::Hmac(key),
        })
    }

    /// The scheme this key signs with.
    pub fn scheme(&self) -> SignatureScheme {
        match self.key {
            Key::Hmac(_) => SignatureScheme::HmacSha256,
            Key::Ed25519(_) => SignatureScheme::Ed25519,
        }
    }

    /// The `whsec_...` or `whsk_...` text: only for storage.
    pub fn expose(&self) -> &str {
        &self.encoded
    }

    /// What a receiver verifies with, for the create and rotate-secret answers: the `whsec_`
    /// secret itself for HMAC, the `whpk_` public key for ed25519 (the private key never leaves
    /// the Secret).
    pub fn for_receiver(&self) -> String {
        match &self.key {
            Key::Hmac(_) => self.encoded.clone(),
            Key::Ed25519(pair) => format!("{PUBLIC_KEY_PREFIX}{}", BASE64.encode(pair.public_key().as_ref())),
        }
    }

    /// The Standard Webhooks signature of one message with this key: `v1,<base64>` (HMAC) or
    /// `v1a,<base64>` (ed25519), over `{msg_id}.{timestamp}.{body}`.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        match &self.key {
            Key::Hmac(key) => {
                let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
                mac.update(msg_id.as_bytes());
                mac.update(b".");
                mac.update(timestamp.to_string().as_bytes());
                mac.update(b".");
                mac.update(body);
                format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
            }
            Key::Ed25519(pair) => {
                let timestamp = timestamp.to_string();
                let mut content = Vec::with_capacity(msg_id.len() + timestamp.len() + body.len() + 2);
                content.extend_from_slice(msg_id.as_bytes());
                content.push(b'.');
                content.extend_from_slice(timestamp.as_bytes());
                content.push(b'.');
                content.extend_from_slice(body);
                format!("v1a,{}", BASE64.encode(pair.sign(&content).as_ref()))
            }
        }
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(<redacted>)")
    }
}

/// A secret replaced by a rotation, still co-signing until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousSecret {
    /// The replaced secret.
    pub secret: SigningSecret,
    /// When it stops co-signing.
    pub expires_at: Timestamp,
}

/// Every secret of one endpoint: the current one, and previous ones within their grace period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRing {
    /// Signs every delivery.
    pub current: SigningSecret,
    /// The `spec.secretRotation` that produced `current`.
    pub rotation: i64,
    /// Replaced secrets, oldest first.
    pub previous: Vec<PreviousSecret>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredPrevious {
    secret: String,
    expires_at: Timestamp,
}

/// What the stored form of a key ring held when it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredKeyRing {
    /// There is no stored key ring.
    Missing,
    /// The stored key ring cannot be used; the reason names what is wrong, never the value.
    Corrupt(String),
    /// A usable key ring.
    Valid(KeyRing),
}

impl KeyRing {
    /// Reads a key ring back from its stored parts (see [`KeyRing::to_parts`]).
    pub fn from_parts(current: Option<&[u8]>, previous: Option<&[u8]>, rotation: Option<&str>) -> StoredKeyRing {
        let Some(current) = current else {
            return StoredKeyRing::Corrupt("the current signing secret is missing".into());
        };
        let current = match std::str::from_utf8(current)
            .map_err(|_| InvalidSecret::NotBase64)
            .and_then(SigningSecret::parse)
        {
            Ok(secret) => secret,
            Err(e) => return StoredKeyRing::Corrupt(e.to_string()),
        };
        let rotation = match rotation.map(str::parse::<i64>) {
            None => 0,
            Some(Ok(r)) => r,
            Some(Err(_)) => return StoredKeyRing::Corrupt("the rotation number is not an integer".into()),
        };
        // A damaged list of previous secrets only loses co-signing; the current secret stays.
        let previous = previous
            .and_then(|raw| serde_json::from_slice::<Vec<StoredPrevious>>(raw).ok())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| {
                SigningSecret::parse(&p.secret).ok().map(|secret| PreviousSecret {
                    secret,
                    expires_at: p.expires_at,
                })
            })
            .collect();
        StoredKeyRing::Valid(KeyRing {
            current,
            rotation,
            previous,
        })
    }

    /// The stored parts: current secret, JSON list of previous secrets, rotation number.
    pub fn to_parts(&self) -> (String, String, String) {
        let previous: Vec<StoredPrevious> = self
            .previous
            .iter()
            .map(|p| StoredPrevious {
                secret: p.secret.expose().to_string(),
                expires_at: p.expires_at,
            })
            .collect();
        (
            self.current.expose().to_string(),
            serde_json::to_string(&previous).expect("previous secrets serialize"),
            self.rotation.to_string(),
        )
    }

    /// Secrets that sign a message sent at `now`: the current one first, then unexpired previous ones.
    pub fn signing_secrets(&self, now: Timestamp) -> impl Iterator<Item = &SigningSecret> {
        std::iter::once(&self.current).chain(
            self.previous
                .iter()
                .rev()
                .filter(move |p| p.expires_at > now)
                .map(|p| &p.secret),
        )
    }

    /// The `webhook-signature` header value: one signature per secret (`v1,` or `v1a,` after its
    /// scheme), space separated.
    pub fn signature_header(&self, now: Timestamp, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        self.signing_secrets(now)
            .map(|s| s.sign(msg_id, timestamp, body))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// When the next previous secret expires, if any does.
    pub fn next_expiry(&self) -> Option<Timestamp> {
        self.previous.iter().map(|p| p.expires_at).min()
    }
}

/// What [`plan_key_ring`] did to the stored key ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRingChange {
    /// Nothing; the stored ring is what we want.
    Unchanged,
    /// A first secret was generated.
    Created,
    /// The stored ring was gone or unusable, so a new secret replaced it.
    Repaired {
        /// What was wrong (never the secret itself).
        reason: String,
    },
    /// A rotation replaced the current secret; the old one co-signs until its expiry.
    Rotated,
    /// Expired previous secrets were removed.
    Pruned,
}

/// The key ring to store and why.
#[derive(Debug, Clone)]
pub struct KeyRingPlan {
    /// The ring that should be stored.
    pub ring: KeyRing,
    /// How it differs from what was stored.
    pub change: KeyRingChange,
}

/// What the endpoint asks of its key ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WantedKeys {
    /// `spec.secretRotation`.
    pub rotation: i64,
    /// `spec.signatureScheme`.
    pub scheme: SignatureScheme,
}

/// Decides the key ring an endpoint should have.
///
/// `existed_before` says whether the controller had already made a secret for this endpoint (its
/// status names one), which tells a first creation from a deleted secret that needs repair.
/// An existing valid secret is never regenerated except by a rotation, or by a change of scheme,
/// which rotates the same way: the old key (of the old scheme) co-signs for the grace period.
pub fn plan_key_ring<G>(
    stored: StoredKeyRing,
    existed_before: bool,
    wanted: WantedKeys,
    now: Timestamp,
    grace: Duration,
    generate: G,
) -> KeyRingPlan
where
    G: FnOnce(SignatureScheme) -> SigningSecret,
{
    let wanted_rotation = wanted.rotation;
    let fresh = |change, generate: &mut Option<_>| KeyRingPlan {
        ring: KeyRing {
            current: generate.take().map(|g: G| g(wanted.scheme)).expect("generates once"),
            rotation: wanted_rotation,
            previous: Vec::new(),
        },
        change,
    };
    let mut generate = Some(generate);
    match stored {
        StoredKeyRing::Missing if existed_before => fresh(
            KeyRingChange::Repaired {
                reason: "the signing Secret was deleted".into(),
            },
            &mut generate,
        ),
        StoredKeyRing::Missing => fresh(KeyRingChange::Created, &mut generate),
        StoredKeyRing::Corrupt(reason) => fresh(KeyRingChange::Repaired { reason }, &mut generate),
        StoredKeyRing::Valid(mut ring) => {
            let before = ring.previous.len();
            ring.previous.retain(|p| p.expires_at > now);
            let mut change = if ring.previous.len() != before {
                KeyRingChange::Pruned
            } else {
                KeyRingChange::Unchanged
            };
            if wanted_rotation > ring.rotation || ring.current.scheme() != wanted.scheme {
                let expires_at = now.checked_add(grace).unwrap_or(Timestamp::MAX);
                let new = generate.take().map(|g| g(wanted.scheme)).expect("generates once");
                let old = std::mem::replace(&mut ring.current, new);
                ring.previous.push(PreviousSecret {
                    secret: old,
                    expires_at,
                });
                if ring.previous.len() > MAX_PREVIOUS_SECRETS {
                    let excess = ring.previous.len() - MAX_PREVIOUS_SECRETS;
                    ring.previous.drain(..excess);
                }
                ring.rotation = ring.rotation.max(wanted_rotation);
                change = KeyRingChange::Rotated;
            }
            KeyRingPlan { ring, change }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hmac(rotation: i64) -> WantedKeys {
        WantedKeys {
            rotation,
            scheme: SignatureScheme::HmacSha256,
        }
    }

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn standard_webhooks_test_vector() {
        let secret = SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn generated_secrets_have_the_standard_format_and_differ() {
        let a = SigningSecret::generate();
        let b = SigningSecret::generate();
        assert!(a.expose().starts_with("whsec_"));
        // 32 bytes in base64 are 44 characters.
        assert_eq!(a.expose().len(), "whsec_".len() + 44);
        assert_eq!(SigningSecret::parse(a.expose()).unwrap(), a);
        assert_ne!(a, b);
    }

    #[test]
    fn parse_rejects_malformed_secrets() {
        assert_eq!(
            SigningSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err(InvalidSecret::MissingPrefix)
        );
        assert_eq!(SigningSecret::parse("whsec_***"), Err(InvalidSecret::NotBase64));
        assert_eq!(SigningSecret::parse("whsec_AAAA"), Err(InvalidSecret::BadLength(3)));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let s = SigningSecret::generate();
        let ring = KeyRing {
            current: s.clone(),
            rotation: 0,
            previous: vec![],
        };
        assert!(!format!("{s:?} {ring:?}").contains(&s.expose()[6..]));
    }

    #[test]
    fn key_ring_round_trips_through_its_stored_parts() {
        let ring = KeyRing {
            current: SigningSecret::generate(),
            rotation: 3,
            previous: vec![PreviousSecret {
                secret: SigningSecret::generate(),
                expires_at: ts(1000),
            }],
        };
        let (c, p, r) = ring.to_parts();
        assert_eq!(
            KeyRing::from_parts(Some(c.as_bytes()), Some(p.as_bytes()), Some(&r)),
            StoredKeyRing::Valid(ring)
        );
    }

    #[test]
    fn corrupt_current_secret_is_reported_without_its_value() {
        match KeyRing::from_parts(Some(b"whsec_short"), None, None) {
            StoredKeyRing::Corrupt(reason) => assert!(!reason.contains("short")),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(matches!(
            KeyRing::from_parts(None, None, None),
            StoredKeyRing::Corrupt(_)
        ));
    }

    #[test]
    fn plan_creates_then_keeps_the_secret() {
        let grace = Duration::from_secs(60);
        let first = plan_key_ring(
            StoredKeyRing::Missing,
            false,
            hmac(0),
            ts(10),
            grace,
            SigningSecret::generate_with,
        );
        assert_eq!(first.change, KeyRingChange::Created);
        let again = plan_key_ring(
            StoredKeyRing::Valid(first.ring.clone()),
            true,
            hmac(0),
            ts(20),
            grace,
            |_| panic!("must not generate"),
        );
        assert_eq!(again.change, KeyRingChange::Unchanged);
        assert_eq!(again.ring, first.ring);
    }

    #[test]
    fn plan_repairs_deleted_and_corrupt_secrets() {
        let grace = Duration::from_secs(60);
        let deleted = plan_key_ring(
            StoredKeyRing::Missing,
            true,
            hmac(2),
            ts(10),
            grace,
            SigningSecret::generate_with,
        );
        assert!(matches!(deleted.change, KeyRingChange::Repaired { .. }));
        assert_eq!(deleted.ring.rotation, 2);
        let corrupt = plan_key_ring(
            StoredKeyRing::Corrupt("bad".into()),
            true,
            hmac(0),
            ts(10),
            grace,
            SigningSecret::generate_with,
        );
        assert_eq!(corrupt.change, KeyRingChange::Repaired { reason: "bad".into() });
    }

    #[test]
    fn rotation_keeps_the_previous_secret_until_the_grace_period_ends() {
        let grace = Duration::from_secs(60);
        let ring = plan_key_ring(
            StoredKeyRing::Missing,
            false,
            hmac(0),
            ts(0),
            grace,
            SigningSecret::generate_with,
        )
        .ring;
        let old = ring.current.clone();
        let rotated = plan_key_ring(
            StoredKeyRing::Valid(ring),
            true,
            hmac(1),
            ts(100),
            grace,
            SigningSecret::generate_with,
        );
        assert_eq!(rotated.change, KeyRingChange::Rotated);
        assert_ne!(rotated.ring.current, old);
        assert_eq!(
            rotated.ring.previous,
            vec![PreviousSecret {
                secret: old.clone(),
                expires_at: ts(160)
            }]
        );
        assert_eq!(rotated.ring.next_expiry(), Some(ts(160)));
        // Both sign within the grace period, the current one first.
        assert_eq!(rotated.ring.signing_secrets(ts(159)).count(), 2);
        assert_eq!(
            rotated.ring.signing_secrets(ts(159)).next(),
            Some(&rotated.ring.current)
        );
        // After it, only the current secret signs, and the next plan prunes the old one.
        assert_eq!(rotated.ring.signing_secrets(ts(160)).count(), 1);
        let pruned = plan_key_ring(
            StoredKeyRing::Valid(rotated.ring),
            true,
            hmac(1),
            ts(160),
            grace,
            |_| panic!("no generation"),
        );
        assert_eq!(pruned.change, KeyRingChange::Pruned);
        assert!(pruned.ring.previous.is_empty());
        assert_eq!(pruned.ring.next_expiry(), None);
    }

    #[test]
    fn a_rotation_already_done_is_not_repeated() {
        let grace = Duration::from_secs(60);
        let ring = plan_key_ring(
            StoredKeyRing::Missing,
            false,
            hmac(5),
            ts(0),
            grace,
            SigningSecret::generate_with,
        )
        .ring;
        let plan = plan_key_ring(StoredKeyRing::Valid(ring), true, hmac(5), ts(1), grace, |_| {
            panic!("no generation")
        });
        assert_eq!(plan.change, KeyRingChange::Unchanged);
    }

    #[test]
    fn previous_secrets_are_bounded() {
        let grace = Duration::from_secs(3600);
        let mut ring = plan_key_ring(
            StoredKeyRing::Missing,
            false,
            hmac(0),
            ts(0),
            grace,
            SigningSecret::generate_with,
        )
        .ring;
        for rotation in 1..=20 {
            ring = plan_key_ring(
                StoredKeyRing::Valid(ring),
                true,
                hmac(rotation),
                ts(rotation),
                grace,
                SigningSecret::generate_with,
            )
            .ring;
        }
        assert_eq!(ring.previous.len(), MAX_PREVIOUS_SECRETS);
        assert_eq!(ring.rotation, 20);
    }

    #[test]
    fn signature_header_has_one_signature_per_live_secret() {
        let grace = Duration::from_secs(60);
        let ring = plan_key_ring(
            StoredKeyRing::Missing,
            false,
            hmac(0),
            ts(0),
            grace,
            SigningSecret::generate_with,
        )
        .ring;
        let ring = plan_key_ring(
            StoredKeyRing::Valid(ring),
            true,
            hmac(1),
            ts(0),
            grace,
            SigningSecret::generate_with,
        )
        .ring;
        let header = ring.signature_header(ts(1), "msg_1", 1, b"{}");
        let parts: Vec<_> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.starts_with("v1,")));
        assert_eq!(parts[0], ring.current.sign("msg_1", 1, b"{}"));
    }

    /// RFC 8032, section 7.1, test 1: the seed and the public key it gives.
    const RFC8032_SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
    const RFC8032_PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn ed25519_keys_have_svix_forms_and_sign_v1a_over_the_v1_content() {
        let mut stored = unhex(RFC8032_SEED);
        stored.extend(unhex(RFC8032_PUBLIC));
        let key = SigningSecret::parse(&format!("whsk_{}", BASE64.encode(&stored))).unwrap();
        assert_eq!(key.scheme(), SignatureScheme::Ed25519);
        assert_eq!(
            key.for_receiver(),
            format!("whpk_{}", BASE64.encode(unhex(RFC8032_PUBLIC)))
        );
        let signature = key.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        let b64 = signature.strip_prefix("v1a,").expect("a v1a signature");
        let public =
            aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, unhex(RFC8032_PUBLIC));
        public
            .verify(
                br#"msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330.{"test": 2432232314}"#,
                &BASE64.decode(b64).unwrap(),
            )
            .expect("verifies over {id}.{timestamp}.{body}");
        // ed25519 is deterministic: the same message gives the same signature.
        assert_eq!(
            key.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#),
            signature
        );
    }

    #[test]
    fn generated_ed25519_keys_round_trip_and_never_show_the_private_half() {
        let key = SigningSecret::generate_with(SignatureScheme::Ed25519);
        assert!(key.expose().starts_with("whsk_"));
        assert_eq!(SigningSecret::parse(key.expose()).unwrap(), key);
        let public = key.for_receiver();
        assert!(public.starts_with("whpk_"));
        assert_eq!(BASE64.decode(&public[5..]).unwrap().len(), 32);
        assert!(!public.contains(&key.expose()[5..]));
        assert!(!format!("{key:?}").contains(&key.expose()[5..]));
        // The HMAC form is unchanged: what the receiver gets is the secret itself.
        let hmac = SigningSecret::generate();
        assert_eq!(hmac.for_receiver(), hmac.expose());
    }

    #[test]
    fn a_private_key_whose_public_half_does_not_match_is_refused() {
        let mut stored = unhex(RFC8032_SEED);
        stored.extend([7u8; 32]);
        assert_eq!(
            SigningSecret::parse(&format!("whsk_{}", BASE64.encode(&stored))),
            Err(InvalidSecret::BadEd25519Key)
        );
        assert_eq!(
            SigningSecret::parse(&format!("whsk_{}", BASE64.encode(unhex(RFC8032_SEED)))),
            Err(InvalidSecret::BadEd25519Key)
        );
    }

    #[test]
    fn a_change_of_scheme_rotates_and_both_schemes_co_sign_in_the_grace_period() {
        let grace = Duration::from_secs(60);
        let ring = plan_key_ring(
            StoredKeyRing::Missing,
            false,
            hmac(0),
            ts(0),
            grace,
            SigningSecret::generate_with,
        )
        .ring;
        let ed25519 = WantedKeys {
            rotation: 0,
            scheme: SignatureScheme::Ed25519,
        };
        let changed = plan_key_ring(
            StoredKeyRing::Valid(ring.clone()),
            true,
            ed25519,
            ts(10),
            grace,
            SigningSecret::generate_with,
        );
        assert_eq!(changed.change, KeyRingChange::Rotated);
        assert_eq!(changed.ring.current.scheme(), SignatureScheme::Ed25519);
        assert_eq!(changed.ring.rotation, 0);
        assert_eq!(changed.ring.previous[0].secret, ring.current);
        let header = changed.ring.signature_header(ts(11), "msg_1", 11, b"{}");
        let parts: Vec<_> = header.split(' ').collect();
        assert!(parts[0].starts_with("v1a,") && parts[1].starts_with("v1,"), "{header}");
        assert_eq!(parts[1], ring.current.sign("msg_1", 11, b"{}"));
        // The key of the new scheme is kept from then on, and back to HMAC rotates again.
        let kept = plan_key_ring(
            StoredKeyRing::Valid(changed.ring.clone()),
            true,
            ed25519,
            ts(12),
            grace,
            |_| panic!("no generation"),
        );
        assert_eq!(kept.change, KeyRingChange::Unchanged);
        let back = plan_key_ring(
            StoredKeyRing::Valid(changed.ring),
            true,
            hmac(1),
            ts(13),
            grace,
            SigningSecret::generate_with,
        );
        assert_eq!(back.change, KeyRingChange::Rotated);
        assert_eq!(back.ring.current.scheme(), SignatureScheme::HmacSha256);
        assert_eq!(back.ring.rotation, 1);
        let header = back.ring.signature_header(ts(14), "msg_1", 14, b"{}");
        assert_eq!(
            header
                .split(' ')
                .map(|p| p.split(',').next().unwrap())
                .collect::<Vec<_>>(),
            ["v1", "v1a", "v1"]
        );
    }
}
