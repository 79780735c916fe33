//! Portal sessions: short-lived bearer tokens the operator signs itself, each bound to one
//! organization and optionally read-only, so a customer's browser can use the REST routes
//! without ever holding an API key.
//!
//! A token is `capy_portal_` + base64url(JSON claims) + `.` + base64url(HMAC-SHA256 over
//! everything before the dot). The key is the operator's own portal key, Secret
//! `capy-webhooks-portal-key` in the home namespace (`crate::api::PORTAL_KEY_SECRET`), so every
//! replica verifies what any replica issued and a restart keeps sessions valid. Sessions cannot be
//! revoked one by one: they are short (`--portal-session-ttl`, 1 h by default), and deleting that
//! Secret (then restarting the operator) ends all of them. It is not the delivery-log key:
//! deleting `capy-webhooks-log-key` ends no session and makes every log untrusted.
//!
//! Pure: issuing and verifying take the time as an argument and do no IO.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::AuthError;

/// Every portal token starts with this.
pub const TOKEN_PREFIX: &str = "capy_portal_";
/// Default lifetime of a session.
pub const DEFAULT_TTL: SignedDuration = SignedDuration::from_hours(1);
/// Longest lifetime `--portal-session-ttl` accepts: a session is a browser tab, not a credential.
pub const MAX_TTL: SignedDuration = SignedDuration::from_hours(24);

/// What a portal token says. Field names are short: the token travels in every request.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PortalClaims {
    /// The organization the session may act for.
    pub org: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Read-only: no route that changes anything.
    pub ro: bool,
    /// Random session id, named in audit logs instead of the token.
    pub sid: String,
}

/// A session as the portal-sessions route answers it.
#[derive(Debug, Clone)]
pub struct IssuedSession {
    /// The bearer token.
    pub token: String,
    /// When it stops being accepted.
    pub expires_at: Timestamp,
    /// Its claims.
    pub claims: PortalClaims,
}

/// Issues and verifies portal tokens with one key.
#[derive(Clone)]
pub struct PortalSessions {
    key: [u8; 32],
    ttl: SignedDuration,
}

impl std::fmt::Debug for PortalSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortalSessions")
            .field("key", &"<redacted>")
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl PortalSessions {
    /// Sessions signed with `key` that last `ttl`.
    pub fn new(key: [u8; 32], ttl: SignedDuration) -> Self {
        Self { key, ttl }
    }

    /// How long a new session lasts.
    pub fn ttl(&self) -> SignedDuration {
        self.ttl
    }

    fn mac(&self, signed_part: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(signed_part.as_bytes());
        mac
    }

    /// A new session for `organization_id`, starting at `now`.
    pub fn issue(&self, organization_id: &str, read_only: bool, now: Timestamp) -> IssuedSession {
        let expires_at = now.checked_add(self.ttl).unwrap_or(Timestamp::MAX);
        let claims = PortalClaims {
            org: organization_id.to_string(),
            exp: expires_at.as_second(),
            iat: now.as_second(),
            ro: read_only,
            sid: crate::ids::time_sortable_id(now),
        };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("claims serialize"));
        let signed_part = format!("{TOKEN_PREFIX}{payload}");
        let signature = URL_SAFE_NO_PAD.encode(self.mac(&signed_part).finalize().into_bytes());
        IssuedSession {
            token: format!("{signed_part}.{signature}"),
            expires_at: Timestamp::from_second(claims.exp).unwrap_or(expires_at),
            claims,
        }
    }

    /// The claims of a token this key signed that has not expired at `now`. The signature is
    /// checked in constant time before the claims are read; errors never contain the token.
    pub fn verify(&self, token: &str, now: Timestamp) -> Result<PortalClaims, AuthError> {
        let invalid = |why: &str| AuthError::InvalidToken(format!("portal session {why}"));
        let (signed_part, signature) = token.rsplit_once('.').ok_or_else(|| invalid("is malformed"))?;
        let payload = signed_part
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| invalid("is malformed"))?;
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| invalid("is malformed"))?;
        self.mac(signed_part)
            .verify_slice(&signature)
            .map_err(|_| invalid("has a bad signature"))?;
        let claims: PortalClaims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or_else(|| invalid("is malformed"))?;
        if now.as_second() >= claims.exp {
            return Err(invalid("has expired; open a new portal link"));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> PortalSessions {
        PortalSessions::new([3; 32], DEFAULT_TTL)
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn an_issued_session_verifies_until_it_expires() {
        let issued = sessions().issue("org_a", true, at(0));
        assert!(issued.token.starts_with(TOKEN_PREFIX));
        assert_eq!(issued.expires_at, at(3600));
        let claims = sessions().verify(&issued.token, at(3599)).unwrap();
        assert_eq!(
            (claims.org.as_str(), claims.ro, claims.exp),
            ("org_a", true, at(3600).as_second())
        );
        let expired = sessions().verify(&issued.token, at(3600)).unwrap_err();
        assert!(expired.to_string().contains("expired"), "{expired}");
    }

    #[test]
    fn forged_and_foreign_tokens_are_refused_without_echoing_them() {
        let issued = sessions().issue("org_a", true, at(0));
        let (signed, signature) = issued.token.rsplit_once('.').unwrap();
        // Claims changed (another organization, writable), signature kept.
        let forged_claims = PortalClaims {
            org: "org_b".into(),
            ro: false,
            ..issued.claims.clone()
        };
        let forged = format!(
            "{TOKEN_PREFIX}{}.{signature}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged_claims).unwrap())
        );
        // Signed by another key.
        let other_key = PortalSessions::new([4; 32], DEFAULT_TTL)
            .issue("org_a", false, at(0))
            .token;
        for bad in [
            forged.as_str(),
            other_key.as_str(),
            signed,
            &format!("{signed}.AAAA"),
            &format!("{signed}.!!!"),
            "capy_portal_",
            "capy_portal_x.y",
            &issued.token[..issued.token.len() - 1],
        ] {
            let err = sessions().verify(bad, at(1)).unwrap_err();
            assert!(matches!(err, AuthError::InvalidToken(_)), "{bad}: {err:?}");
            assert!(!err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn debug_output_hides_the_key() {
        let text = format!("{:?}", sessions());
        assert!(text.contains("redacted") && !text.contains("[3, 3"), "{text}");
    }
}
