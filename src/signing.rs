//! Standard Webhooks signing secrets, their rotation, and the signature itself.
//!
//! Pure domain logic: no Kubernetes types and no IO. The controller stores a [`KeyRing`] in a
//! Secret; the dispatcher signs with every secret the ring still honours.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use jiff::Timestamp;
use rand::TryRngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Prefix of every signing secret (the Standard Webhooks format).
pub const SECRET_PREFIX: &str = "whsec_";
/// Random bytes in a secret this operator generates.
pub const GENERATED_SECRET_BYTES: usize = 32;
/// Smallest key accepted when reading a secret back.
pub const MIN_SECRET_BYTES: usize = 24;
/// Largest key accepted when reading a secret back.
pub const MAX_SECRET_BYTES: usize = 64;
/// Previous secrets kept at most, however often the secret is rotated within a grace period.
pub const MAX_PREVIOUS_SECRETS: usize = 8;

/// A `whsec_` signing secret. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret {
    encoded: String,
    key: Vec<u8>,
}

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
}

impl SigningSecret {
    /// A fresh secret of [`GENERATED_SECRET_BYTES`] bytes from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut key = vec![0u8; GENERATED_SECRET_BYTES];
        rand::rngs::OsRng
            .try_fill_bytes(&mut key)
            .expect("the OS random number generator works");
        Self::from_key(key)
    }

    fn from_key(key: Vec<u8>) -> Self {
        Self {
            encoded: format!("{SECRET_PREFIX}{}", BASE64.encode(&key)),
            key,
        }
    }

    /// Parses a stored `whsec_...` value.
    pub fn parse(value: &str) -> Result<Self, InvalidSecret> {
        let b64 = value.strip_prefix(SECRET_PREFIX).ok_or(InvalidSecret::MissingPrefix)?;
        let key = BASE64.decode(b64.trim()).map_err(|_| InvalidSecret::NotBase64)?;
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&key.len()) {
            return Err(InvalidSecret::BadLength(key.len()));
        }
        Ok(Self {
            encoded: value.trim().to_string(),
            key,
        })
    }

    /// The `whsec_...` text: only for storage and for the create and rotate-secret responses.
    pub fn expose(&self) -> &str {
        &self.encoded
    }

    /// The Standard Webhooks signature of one message with this secret, `v1,<base64>`.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
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

    /// The `webhook-signature` header value: one `v1,` signature per secret, space separated.
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

/// Decides the key ring an endpoint should have.
///
/// `existed_before` says whether the controller had already made a secret for this endpoint (its
/// status names one), which tells a first creation from a deleted secret that needs repair.
/// An existing valid secret is never regenerated except by a rotation.
pub fn plan_key_ring<G>(
    stored: StoredKeyRing,
    existed_before: bool,
    wanted_rotation: i64,
    now: Timestamp,
    grace: Duration,
    generate: G,
) -> KeyRingPlan
where
    G: FnOnce() -> SigningSecret,
{
    let fresh = |change, generate: &mut Option<_>| KeyRingPlan {
        ring: KeyRing {
            current: generate.take().map(|g: G| g()).expect("generates once"),
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
            if wanted_rotation > ring.rotation {
                let expires_at = now.checked_add(grace).unwrap_or(Timestamp::MAX);
                let new = generate.take().map(|g| g()).expect("generates once");
                let old = std::mem::replace(&mut ring.current, new);
                ring.previous.push(PreviousSecret {
                    secret: old,
                    expires_at,
                });
                if ring.previous.len() > MAX_PREVIOUS_SECRETS {
                    let excess = ring.previous.len() - MAX_PREVIOUS_SECRETS;
                    ring.previous.drain(..excess);
                }
                ring.rotation = wanted_rotation;
                change = KeyRingChange::Rotated;
            }
            KeyRingPlan { ring, change }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let first = plan_key_ring(StoredKeyRing::Missing, false, 0, ts(10), grace, SigningSecret::generate);
        assert_eq!(first.change, KeyRingChange::Created);
        let again = plan_key_ring(StoredKeyRing::Valid(first.ring.clone()), true, 0, ts(20), grace, || {
            panic!("must not generate")
        });
        assert_eq!(again.change, KeyRingChange::Unchanged);
        assert_eq!(again.ring, first.ring);
    }

    #[test]
    fn plan_repairs_deleted_and_corrupt_secrets() {
        let grace = Duration::from_secs(60);
        let deleted = plan_key_ring(StoredKeyRing::Missing, true, 2, ts(10), grace, SigningSecret::generate);
        assert!(matches!(deleted.change, KeyRingChange::Repaired { .. }));
        assert_eq!(deleted.ring.rotation, 2);
        let corrupt = plan_key_ring(
            StoredKeyRing::Corrupt("bad".into()),
            true,
            0,
            ts(10),
            grace,
            SigningSecret::generate,
        );
        assert_eq!(corrupt.change, KeyRingChange::Repaired { reason: "bad".into() });
    }

    #[test]
    fn rotation_keeps_the_previous_secret_until_the_grace_period_ends() {
        let grace = Duration::from_secs(60);
        let ring = plan_key_ring(StoredKeyRing::Missing, false, 0, ts(0), grace, SigningSecret::generate).ring;
        let old = ring.current.clone();
        let rotated = plan_key_ring(
            StoredKeyRing::Valid(ring),
            true,
            1,
            ts(100),
            grace,
            SigningSecret::generate,
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
        let pruned = plan_key_ring(StoredKeyRing::Valid(rotated.ring), true, 1, ts(160), grace, || {
            panic!("no generation")
        });
        assert_eq!(pruned.change, KeyRingChange::Pruned);
        assert!(pruned.ring.previous.is_empty());
        assert_eq!(pruned.ring.next_expiry(), None);
    }

    #[test]
    fn a_rotation_already_done_is_not_repeated() {
        let grace = Duration::from_secs(60);
        let ring = plan_key_ring(StoredKeyRing::Missing, false, 5, ts(0), grace, SigningSecret::generate).ring;
        let plan = plan_key_ring(StoredKeyRing::Valid(ring), true, 5, ts(1), grace, || {
            panic!("no generation")
        });
        assert_eq!(plan.change, KeyRingChange::Unchanged);
    }

    #[test]
    fn previous_secrets_are_bounded() {
        let grace = Duration::from_secs(3600);
        let mut ring = plan_key_ring(StoredKeyRing::Missing, false, 0, ts(0), grace, SigningSecret::generate).ring;
        for rotation in 1..=20 {
            ring = plan_key_ring(
                StoredKeyRing::Valid(ring),
                true,
                rotation,
                ts(rotation),
                grace,
                SigningSecret::generate,
            )
            .ring;
        }
        assert_eq!(ring.previous.len(), MAX_PREVIOUS_SECRETS);
        assert_eq!(ring.rotation, 20);
    }

    #[test]
    fn signature_header_has_one_signature_per_live_secret() {
        let grace = Duration::from_secs(60);
        let ring = plan_key_ring(StoredKeyRing::Missing, false, 0, ts(0), grace, SigningSecret::generate).ring;
        let ring = plan_key_ring(
            StoredKeyRing::Valid(ring),
            true,
            1,
            ts(0),
            grace,
            SigningSecret::generate,
        )
        .ring;
        let header = ring.signature_header(ts(1), "msg_1", 1, b"{}");
        let parts: Vec<_> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.starts_with("v1,")));
        assert_eq!(parts[0], ring.current.sign("msg_1", 1, b"{}"));
    }
}
