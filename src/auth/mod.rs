//! Authentication of the public REST API: who is calling.
//!
//! Two credential kinds arrive in `Authorization: Bearer <token>`:
//! - API keys (`capy_live_…`), stored as Secrets that hold only a SHA-256 hash, served from a
//!   watch-backed index ([`api_keys`]) so no request calls the API server;
//! - Clerk session tokens (RS256 JWTs), verified against a cached JWKS ([`clerk`]).
//!
//! This module only answers "who is this?" ([`Principal`]) or "not authenticated" ([`AuthError`],
//! 401, or 503 when the signing keys cannot be fetched). Authorization is the REST layer's job,
//! on the rule [`Principal::may_act_on`] states: a principal of another organization than the one
//! in the path gets 403. A project-scoped API key ([`Principal::project_id`] is `Some`) is
//! accepted on every route of its own organization, as CapyDB's reference says ("org or
//! project-scoped API key" on each route): webhook endpoints are organization-wide and carry no
//! project, so there is nothing narrower to hold the key to.
//!
//! Nothing here ever puts a token or key into an error message, a log line or a `Debug` output.

pub mod api_keys;
pub mod clerk;
pub mod portal_token;

use std::sync::Arc;

pub use api_keys::{ApiKeyIndex, ApiKeyRecord};
pub use clerk::{ClerkConfig, ClerkVerifier, JwksSource};
pub use portal_token::{IssuedSession, PortalSessions};

/// Longest bearer token accepted, in bytes; longer ones are malformed without further parsing.
pub const MAX_TOKEN_LENGTH: usize = 8192;

/// Who is calling. Holds no secret, so `Debug` is safe to log.
///
/// The REST layer authorizes with [`Principal::may_act_on`]: 403 when `organization_id` differs
/// from the organization in the path, whatever `project_id` is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The organization the credential belongs to.
    pub organization_id: String,
    /// The project inside the organization a project-scoped API key is limited to; `None` for
    /// organization-wide keys and session tokens.
    pub project_id: Option<String>,
    /// Which credential authenticated the call (named in the audit logs of writes).
    pub credential: CredentialKind,
}

impl Principal {
    /// Whether this credential may act on the webhook endpoints of organization `org`: exactly when
    /// it belongs to `org`.
    ///
    /// A project-scoped API key counts as a key of its organization. Webhook endpoints carry no
    /// project (each receives the events of every project it subscribes to), so a project key
    /// lists, creates and manages the organization's endpoints as an organization key does, and no
    /// other organization's. Should endpoints ever carry a project, this is where a project key
    /// would be narrowed to the endpoints of its project (the README's "Decisions" states that
    /// rule).
    pub fn may_act_on(&self, org: &str) -> bool {
        self.organization_id == org
    }

    /// Whether this credential may only read (a read-only portal session).
    pub fn read_only(&self) -> bool {
        matches!(self.credential, CredentialKind::PortalSession { read_only: true, .. })
    }
}

/// The kind of credential that authenticated a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialKind {
    /// An API key; `key_id` is the public id of the key (not the key).
    ApiKey {
        /// Id of the key (the suffix of its Secret's name).
        key_id: String,
    },
    /// A Clerk session token.
    Session {
        /// The Clerk user (`sub` claim).
        user_id: String,
    },
    /// A portal session token the operator issued.
    PortalSession {
        /// The session's random id (not the token).
        session_id: String,
        /// Whether the session may only read.
        read_only: bool,
    },
}

/// For audit logs: the key's public id or the session's user, never a secret.
impl std::fmt::Display for CredentialKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredentialKind::ApiKey { key_id } => write!(f, "api-key:{key_id}"),
            CredentialKind::Session { user_id } => write!(f, "session:{user_id}"),
            CredentialKind::PortalSession { session_id, .. } => write!(f, "portal-session:{session_id}"),
        }
    }
}

/// Why a request is not authenticated. Messages are safe to show to the caller: they never
/// contain the token or key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("missing Authorization header")]
    Missing,
    /// The header is not `Bearer <token>`, or the token is neither an API key nor a JWT.
    #[error("malformed Authorization header: expected `Bearer <API key or session token>`")]
    Malformed,
    /// An API key that is not (or no longer) known.
    #[error("unknown or revoked API key")]
    UnknownKey,
    /// A session token that failed verification; the reason is short and never holds the token.
    #[error("invalid session token: {0}")]
    InvalidToken(String),
    /// A session token was given but this server has no JWKS configured.
    #[error("session tokens are not accepted by this server")]
    NotConfigured,
    /// The session-token signing keys could not be fetched.
    #[error("session tokens cannot be verified right now: {0}")]
    JwksUnavailable(String),
    /// A valid session whose role in the organization is not one this server requires.
    #[error("your role in this organization may not manage webhooks; ask an admin (required: {0})")]
    RoleNotAllowed(String),
}

impl AuthError {
    /// HTTP status of the error: 503 when the signing keys are unavailable, 403 for a role that is
    /// not allowed, 401 otherwise.
    pub fn status_code(&self) -> u16 {
        match self {
            AuthError::JwksUnavailable(_) => 503,
            AuthError::RoleNotAllowed(_) => 403,
            _ => 401,
        }
    }
}

/// Which credential a bearer token is, by its shape.
#[derive(Debug, PartialEq, Eq)]
enum TokenKind<'a> {
    ApiKey(&'a str),
    Portal(&'a str),
    Jwt(&'a str),
}

/// Extracts the token of `Bearer <token>` (scheme case-insensitive, exactly one token) and tells
/// its kind.
fn parse_authorization(header: Option<&str>) -> Result<TokenKind<'_>, AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    let token = crate::http::bearer_token(header).ok_or(AuthError::Malformed)?;
    if token.len() > MAX_TOKEN_LENGTH {
        return Err(AuthError::Malformed);
    }
    if token.starts_with(api_keys::KEY_PREFIX) {
        Ok(TokenKind::ApiKey(token))
    } else if token.starts_with(portal_token::TOKEN_PREFIX) {
        Ok(TokenKind::Portal(token))
    } else if token.bytes().filter(|&b| b == b'.').count() == 2 {
        Ok(TokenKind::Jwt(token))
    } else {
        Err(AuthError::Malformed)
    }
}

/// Authenticates requests with either credential kind. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    api_keys: ApiKeyIndex,
    clerk: Option<Arc<ClerkVerifier>>,
    portal: Option<PortalSessions>,
}

impl Authenticator {
    /// An authenticator over the API-key index and, when session tokens are accepted, a Clerk
    /// verifier.
    pub fn new(api_keys: ApiKeyIndex, clerk: Option<Arc<ClerkVerifier>>) -> Self {
        Authenticator {
            api_keys,
            clerk,
            portal: None,
        }
    }

    /// Also accepts the portal sessions `sessions` issues.
    pub fn with_portal_sessions(mut self, sessions: PortalSessions) -> Self {
        self.portal = Some(sessions);
        self
    }

    /// The portal sessions this authenticator accepts, when it accepts any.
    pub fn portal_sessions(&self) -> Option<&PortalSessions> {
        self.portal.as_ref()
    }

    /// The API-key index (for readiness).
    pub fn api_keys(&self) -> &ApiKeyIndex {
        &self.api_keys
    }

    /// Authenticates one request. `header` is the raw `Authorization` header value (`None` if
    /// absent). Never calls the Kubernetes API; may fetch the JWKS when a token names an unknown
    /// signing key (rate-limited, see [`ClerkConfig::min_refresh_interval`]).
    pub async fn authenticate(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        match parse_authorization(header)? {
            TokenKind::ApiKey(key) => {
                if !api_keys::looks_like_key(key) {
                    return Err(AuthError::UnknownKey);
                }
                let record = self.api_keys.lookup(key).ok_or(AuthError::UnknownKey)?;
                Ok(Principal {
                    organization_id: record.organization_id,
                    project_id: record.project_id,
                    credential: CredentialKind::ApiKey { key_id: record.id },
                })
            }
            TokenKind::Portal(token) => {
                let portal = self.portal.as_ref().ok_or(AuthError::NotConfigured)?;
                let claims = portal.verify(token, jiff::Timestamp::now())?;
                Ok(Principal {
                    organization_id: claims.org,
                    project_id: None,
                    credential: CredentialKind::PortalSession {
                        session_id: claims.sid,
                        read_only: claims.ro,
                    },
                })
            }
            TokenKind::Jwt(token) => match &self.clerk {
                Some(clerk) => clerk.verify(token).await,
                None => Err(AuthError::NotConfigured),
            },
        }
    }
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("api_keys", &self.api_keys)
            .field("session_tokens", &self.clerk.is_some())
            .field("portal_sessions", &self.portal.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use jiff::Timestamp;
    use kube::runtime::watcher::Event;

    use super::api_keys::{generate_key, hash_key, secret_for_record};
    use super::clerk::testing::{TestIssuer, session_claims};
    use super::*;

    const ISSUER: &str = "https://clerk.example.test";

    fn index_with(key: &str, org: &str, project: Option<&str>) -> (ApiKeyIndex, String) {
        let record = ApiKeyRecord {
            id: crate::ids::time_sortable_id(jiff::Timestamp::now()),
            organization_id: org.to_string(),
            project_id: project.map(str::to_string),
            name: "ci".to_string(),
            created_at: Timestamp::from_second(1_700_000_000).unwrap(),
            hash: hash_key(key),
        };
        let index = ApiKeyIndex::new();
        index.apply_event(Event::Apply(secret_for_record(&record, "capy")));
        (index, record.id)
    }

    #[test]
    fn parses_the_bearer_scheme() {
        let key = generate_key();
        assert_eq!(parse_authorization(None), Err(AuthError::Missing));
        for header in [
            "",
            "Bearer",
            "Bearer ",
            "Basic abc",
            "Bearer a b",
            "Token a.b.c",
            "a.b.c",
        ] {
            assert_eq!(
                parse_authorization(Some(header)),
                Err(AuthError::Malformed),
                "{header:?}"
            );
        }
        for header in [
            format!("Bearer {key}"),
            format!("bearer  {key}"),
            format!("BEARER\t{key} "),
        ] {
            assert_eq!(parse_authorization(Some(&header)), Ok(TokenKind::ApiKey(&key)));
        }
        assert_eq!(parse_authorization(Some("Bearer a.b.c")), Ok(TokenKind::Jwt("a.b.c")));
        assert_eq!(parse_authorization(Some("Bearer a.b")), Err(AuthError::Malformed));
        assert_eq!(parse_authorization(Some("Bearer a.b.c.d")), Err(AuthError::Malformed));
        let long = format!("Bearer a.b.{}", "c".repeat(MAX_TOKEN_LENGTH));
        assert_eq!(parse_authorization(Some(&long)), Err(AuthError::Malformed));
    }

    #[test]
    fn status_codes() {
        assert_eq!(AuthError::Missing.status_code(), 401);
        assert_eq!(AuthError::Malformed.status_code(), 401);
        assert_eq!(AuthError::UnknownKey.status_code(), 401);
        assert_eq!(AuthError::InvalidToken("token expired".into()).status_code(), 401);
        assert_eq!(AuthError::NotConfigured.status_code(), 401);
        assert_eq!(AuthError::JwksUnavailable("down".into()).status_code(), 503);
    }

    #[tokio::test]
    async fn authenticates_api_keys() {
        let key = generate_key();
        let (index, id) = index_with(&key, "org_1", Some("proj_1"));
        let auth = Authenticator::new(index, None);
        let principal = auth.authenticate(Some(&format!("Bearer {key}"))).await.unwrap();
        assert_eq!(
            principal,
            Principal {
                organization_id: "org_1".into(),
                project_id: Some("proj_1".into()),
                credential: CredentialKind::ApiKey { key_id: id },
            }
        );
        assert!(!format!("{principal:?}").contains(&key));

        let other = generate_key();
        let err = auth.authenticate(Some(&format!("Bearer {other}"))).await.unwrap_err();
        assert_eq!(err, AuthError::UnknownKey);
        assert!(!err.to_string().contains(&other));
        let short = auth.authenticate(Some("Bearer capy_live_abc")).await.unwrap_err();
        assert_eq!(short, AuthError::UnknownKey);
    }

    /// The reference accepts "org or project-scoped API key" on every route: a project key acts on
    /// its own organization exactly as an organization key does, and on no other.
    #[tokio::test]
    async fn project_keys_act_on_their_own_organization_only() {
        for project in [Some("proj_1"), None] {
            let key = generate_key();
            let (index, _) = index_with(&key, "org_1", project);
            let auth = Authenticator::new(index, None);
            let principal = auth.authenticate(Some(&format!("Bearer {key}"))).await.unwrap();
            assert_eq!(principal.project_id.as_deref(), project);
            assert!(principal.may_act_on("org_1"), "{project:?}");
            assert!(!principal.read_only(), "{project:?}");
            for other in ["org_2", "org_10", "org_", "ORG_1", ""] {
                assert!(!principal.may_act_on(other), "{project:?} on {other:?}");
            }
        }
        // A portal session and a Clerk session follow the same rule.
        for credential in [
            CredentialKind::PortalSession {
                session_id: "s".into(),
                read_only: false,
            },
            CredentialKind::Session { user_id: "u".into() },
        ] {
            let principal = Principal {
                organization_id: "org_1".into(),
                project_id: None,
                credential,
            };
            assert!(principal.may_act_on("org_1"));
            assert!(!principal.may_act_on("org_2"));
        }
    }

    #[tokio::test]
    async fn session_tokens_need_a_verifier() {
        let auth = Authenticator::new(ApiKeyIndex::new(), None);
        let err = auth.authenticate(Some("Bearer aaa.bbb.ccc")).await.unwrap_err();
        assert_eq!(err, AuthError::NotConfigured);
    }

    #[tokio::test]
    async fn authenticates_session_tokens() {
        let issuer = TestIssuer::new("kid-1");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, issuer.jwks_json()).unwrap();
        let config = ClerkConfig::new(JwksSource::File(path), ISSUER);
        let clerk = ClerkVerifier::new(config, reqwest::Client::new()).await.unwrap();
        let auth = Authenticator::new(ApiKeyIndex::new(), Some(Arc::new(clerk)));

        let token = issuer.token(&session_claims(ISSUER, "user_1", Some("org_1")));
        let principal = auth.authenticate(Some(&format!("Bearer {token}"))).await.unwrap();
        assert_eq!(principal.organization_id, "org_1");
        assert_eq!(principal.project_id, None);
        assert_eq!(
            principal.credential,
            CredentialKind::Session {
                user_id: "user_1".into()
            }
        );

        let mut claims = session_claims(ISSUER, "user_1", Some("org_1"));
        claims["exp"] = (Timestamp::now() - Duration::from_secs(600)).as_second().into();
        let expired = issuer.token(&claims);
        let err = auth.authenticate(Some(&format!("Bearer {expired}"))).await.unwrap_err();
        assert_eq!(err, AuthError::InvalidToken("token expired".into()));
        assert!(!err.to_string().contains(&expired));
    }
}
