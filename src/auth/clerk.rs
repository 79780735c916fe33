//! Clerk session tokens: RS256 JWTs verified against the Clerk instance's JWKS.
//!
//! The JWKS is loaded once at start and cached. A token naming an unknown key id triggers a
//! reload, at most once per [`ClerkConfig::min_refresh_interval`], so a flood of made-up key ids
//! cannot hammer the JWKS URL. Only RS256 is accepted: `alg: none`, HMAC and every other algorithm
//! are refused before any key is looked up.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{AuthError, CredentialKind, Principal};

/// Default clock-skew allowance for `exp` and `nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(5);
/// Default shortest time between two JWKS reloads triggered by unknown key ids.
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Longest a JWKS fetch may take.
pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest JWKS document accepted, in bytes.
pub const MAX_JWKS_BYTES: usize = 1 << 20;

/// Where the JWKS comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwksSource {
    /// Fetched over HTTP(S), e.g. `https://<instance>.clerk.accounts.dev/.well-known/jwks.json`.
    Url(String),
    /// Read from a file (e.g. a mounted ConfigMap).
    File(PathBuf),
}

impl fmt::Display for JwksSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwksSource::Url(url) => f.write_str(url),
            JwksSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// How session tokens are verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClerkConfig {
    /// Where the signing keys come from.
    pub jwks: JwksSource,
    /// Expected `iss` claim, compared exactly (the Clerk Frontend API URL).
    pub issuer: String,
    /// Accepted `azp` claims (the origins of the apps allowed to call); empty accepts any.
    pub authorized_parties: Vec<String>,
    /// Clock-skew allowance for `exp` and `nbf`, whole seconds.
    pub leeway: Duration,
    /// Shortest time between two reloads triggered by unknown key ids.
    pub min_refresh_interval: Duration,
    /// Organization roles allowed (`org:admin`, ...); empty allows every member.
    pub required_roles: Vec<String>,
}

impl ClerkConfig {
    /// A configuration with no authorized-party check and the default leeway and refresh interval.
    pub fn new(jwks: JwksSource, issuer: impl Into<String>) -> Self {
        ClerkConfig {
            jwks,
            issuer: issuer.into(),
            authorized_parties: Vec::new(),
            leeway: DEFAULT_LEEWAY,
            min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
            required_roles: Vec::new(),
        }
    }
}

/// Placeholder source and issuer (both empty, so [`ClerkVerifier::new`] fails until they are set),
/// default leeway and refresh interval, no authorized-party check. Meant for `..Default::default()`.
impl Default for ClerkConfig {
    fn default() -> Self {
        ClerkConfig::new(JwksSource::Url(String::new()), String::new())
    }
}

/// Signing keys by key id.
type KeySet = HashMap<String, Arc<DecodingKey>>;

/// Bookkeeping of the reloads triggered by unknown key ids.
#[derive(Default)]
struct RefreshState {
    /// When the last reload was attempted; `None` before the first one.
    last_attempt: Option<Instant>,
    /// Whether the last reload failed.
    last_failed: bool,
}

/// Verifies Clerk session tokens.
pub struct ClerkVerifier {
    config: ClerkConfig,
    http: reqwest::Client,
    validation: Validation,
    keys: RwLock<Arc<KeySet>>,
    refresh: tokio::sync::Mutex<RefreshState>,
    loads: AtomicU64,
}

impl fmt::Debug for ClerkVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClerkVerifier")
            .field("jwks", &self.config.jwks)
            .field("issuer", &self.config.issuer)
            .field("keys", &self.current_keys().len())
            .finish()
    }
}

impl ClerkVerifier {
    /// Loads the JWKS once; a source that cannot be read or holds no usable RS256 key is an error
    /// ([`AuthError::JwksUnavailable`]).
    pub async fn new(config: ClerkConfig, http: reqwest::Client) -> Result<Self, AuthError> {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[&config.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = config.leeway.as_secs();
        // No audience is configured, so a token carrying `aud` (made for another service) is refused.
        validation.validate_aud = true;

        let verifier = ClerkVerifier {
            config,
            http,
            validation,
            keys: RwLock::new(Arc::new(HashMap::new())),
            refresh: tokio::sync::Mutex::new(RefreshState::default()),
            loads: AtomicU64::new(0),
        };
        let keys = verifier.load().await.map_err(AuthError::JwksUnavailable)?;
        info!(source = %verifier.config.jwks, keys = keys.len(), "session-token signing keys loaded");
        *verifier.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
        Ok(verifier)
    }

    /// How many times the JWKS has been loaded (start included). For tests and metrics.
    pub fn jwks_loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// Verifies a session token and tells who it belongs to. Error reasons never contain the token.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let kid = checked_key_id(token)?;
        let key = match self.current_keys().get(&kid) {
            Some(key) => Arc::clone(key),
            None => self.refreshed_key(&kid).await?,
        };
        let data = jsonwebtoken::decode::<SessionClaims>(token, &key, &self.validation).map_err(reason)?;
        principal_from_claims(
            data.claims,
            &self.config.authorized_parties,
            &self.config.required_roles,
        )
    }

    fn current_keys(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The key `kid` after reloading the JWKS, unless a reload happened too recently.
    async fn refreshed_key(&self, kid: &str) -> Result<Arc<DecodingKey>, AuthError> {
        let mut state = self.refresh.lock().await;
        // Another request may have reloaded while this one waited for the lock.
        if let Some(key) = self.current_keys().get(kid) {
            return Ok(Arc::clone(key));
        }
        let recent = state
            .last_attempt
            .is_some_and(|at| at.elapsed() < self.config.min_refresh_interval);
        if recent {
            return Err(if state.last_failed {
                AuthError::JwksUnavailable("the signing keys could not be reloaded".into())
            } else {
                invalid("unknown signing key")
            });
        }
        state.last_attempt = Some(Instant::now());
        match self.load().await {
            Ok(keys) => {
                state.last_failed = false;
                let keys = Arc::new(keys);
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&keys);
                info!(keys = keys.len(), "session-token signing keys reloaded");
                keys.get(kid).cloned().ok_or_else(|| invalid("unknown signing key"))
            }
            Err(error) => {
                state.last_failed = true;
                warn!(source = %self.config.jwks, error, "reloading the session-token signing keys failed");
                Err(AuthError::JwksUnavailable(
                    "the signing keys could not be reloaded".into(),
                ))
            }
        }
    }

    /// Reads and parses the JWKS from its source.
    async fn load(&self) -> Result<KeySet, String> {
        self.loads.fetch_add(1, Ordering::Relaxed);
        let bytes = match &self.config.jwks {
            JwksSource::File(path) => tokio::fs::read(path)
                .await
                .map_err(|e| format!("cannot read the JWKS file {}: {e}", path.display()))?,
            JwksSource::Url(url) => tokio::time::timeout(JWKS_FETCH_TIMEOUT, fetch(&self.http, url))
                .await
                .map_err(|_| format!("fetching the JWKS from {url} timed out"))??,
        };
        parse_jwks(&bytes)
    }
}

async fn fetch(http: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let mut response = http
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| format!("fetching the JWKS from {url} failed: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("the JWKS URL {url} answered HTTP {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("reading the JWKS from {url} failed: {e}"))?
    {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(format!("the JWKS at {url} is larger than {MAX_JWKS_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The RS256 signing keys of a JWKS document. Keys of other types or uses, keys without a `kid`
/// and keys that do not parse are skipped; a document with no usable key is an error.
pub fn parse_jwks(bytes: &[u8]) -> Result<HashMap<String, Arc<DecodingKey>>, String> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let raw: RawSet = serde_json::from_slice(bytes).map_err(|e| format!("the JWKS is not valid JSON: {e}"))?;
    let mut keys = HashMap::new();
    for value in raw.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        let usable = matches!(jwk.algorithm, AlgorithmParameters::RSA(_))
            && matches!(jwk.common.public_key_use, None | Some(PublicKeyUse::Signature))
            && matches!(jwk.common.key_algorithm, None | Some(KeyAlgorithm::RS256));
        let Some(kid) = jwk.common.key_id.clone().filter(|kid| !kid.is_empty() && usable) else {
            continue;
        };
        if let Ok(key) = DecodingKey::from_jwk(&jwk) {
            keys.insert(kid, Arc::new(key));
        }
    }
    if keys.is_empty() {
        return Err("the JWKS holds no usable RS256 signing key".into());
    }
    Ok(keys)
}

fn invalid(reason: &str) -> AuthError {
    AuthError::InvalidToken(reason.to_string())
}

/// Checks the header before any key is touched: `alg` must be exactly `RS256`, no `crit`
/// extensions, and a `kid` must name the key. Returns the `kid`.
fn checked_key_id(token: &str) -> Result<String, AuthError> {
    let encoded = token.split('.').next().unwrap_or_default();
    let raw = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| invalid("malformed token"))?;
    let header: serde_json::Value = serde_json::from_slice(&raw).map_err(|_| invalid("malformed token"))?;
    if header.get("alg").and_then(serde_json::Value::as_str) != Some("RS256") {
        return Err(invalid("unsupported algorithm"));
    }
    if header.get("crit").is_some() {
        return Err(invalid("unsupported critical header"));
    }
    // The typed header as the library sees it (it refuses what it cannot parse, `none` included).
    let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("malformed token"))?;
    if header.alg != Algorithm::RS256 {
        return Err(invalid("unsupported algorithm"));
    }
    header
        .kid
        .filter(|kid| !kid.is_empty())
        .ok_or_else(|| invalid("missing key id"))
}

/// Short, token-free reason of a verification failure.
fn reason(error: jsonwebtoken::errors::Error) -> AuthError {
    let reason = match error.kind() {
        ErrorKind::ExpiredSignature => "token expired".to_string(),
        ErrorKind::ImmatureSignature => "token not yet valid".to_string(),
        ErrorKind::InvalidIssuer => "wrong issuer".to_string(),
        ErrorKind::InvalidSignature => "bad signature".to_string(),
        ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => "unsupported algorithm".to_string(),
        ErrorKind::InvalidAudience => "unexpected audience".to_string(),
        ErrorKind::MissingRequiredClaim(claim) => format!("missing claim {}", claim_name(claim)),
        ErrorKind::InvalidClaimFormat(claim) => format!("malformed claim {}", claim_name(claim)),
        _ => "malformed token".to_string(),
    };
    AuthError::InvalidToken(reason)
}

/// Claim names in reasons come from the library's fixed set; anything else is not echoed.
fn claim_name(claim: &str) -> &str {
    match claim {
        "exp" | "nbf" | "iss" | "sub" | "aud" => claim,
        _ => "(unknown)",
    }
}

/// Checks a JWKS URL: https, or http only when `allow_http` (development).
pub fn check_jwks_url(url: &str, allow_http: bool) -> Result<(), String> {
    if url.starts_with("https://") || (allow_http && url.starts_with("http://")) {
        Ok(())
    } else {
        Err("--clerk-jwks-url must be an https:// URL (http:// only with --allow-http)".into())
    }
}

/// The HTTP client that fetches the JWKS: it follows no redirect (the signing keys come only from
/// the configured URL; a redirect could hand them over to another host) and gives up after 10 s.
pub fn jwks_http_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// The claims of a Clerk session token this server reads (the library checks `exp`, `nbf`, `iss`).
#[derive(Debug, Deserialize)]
struct SessionClaims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    azp: Option<String>,
    /// Active organization, session tokens v1.
    #[serde(default)]
    org_id: Option<String>,
    /// Role in the active organization, session tokens v1 (`org:admin`).
    #[serde(default)]
    org_role: Option<String>,
    /// Active organization `{id, rol, slg}`, session tokens v2.
    #[serde(default)]
    o: Option<serde_json::Value>,
}

/// The session's role in its active organization, as Clerk names it (`org:admin`): v1's
/// `org_role`, or v2's `o.rol` (written without the `org:` prefix).
fn session_role(claims: &SessionClaims) -> Option<String> {
    let v1 = claims.org_role.clone().filter(|r| !r.is_empty());
    let v2 = claims
        .o
        .as_ref()
        .and_then(|o| o.get("rol"))
        .and_then(serde_json::Value::as_str)
        .filter(|r| !r.is_empty())
        .map(|r| {
            if r.starts_with("org:") {
                r.to_string()
            } else {
                format!("org:{r}")
            }
        });
    v1.or(v2)
}

fn principal_from_claims(
    claims: SessionClaims,
    authorized_parties: &[String],
    required_roles: &[String],
) -> Result<Principal, AuthError> {
    if !required_roles.is_empty() && !session_role(&claims).is_some_and(|role| required_roles.contains(&role)) {
        return Err(AuthError::RoleNotAllowed(required_roles.join(", ")));
    }
    if !authorized_parties.is_empty() && !claims.azp.as_ref().is_some_and(|azp| authorized_parties.contains(azp)) {
        return Err(invalid("unauthorized party"));
    }
    let user_id = claims
        .sub
        .filter(|sub| !sub.is_empty())
        .ok_or_else(|| invalid("missing claim sub"))?;
    let v1 = claims.org_id.filter(|org| !org.is_empty());
    let v2 = claims
        .o
        .as_ref()
        .and_then(|o| o.get("id"))
        .and_then(serde_json::Value::as_str)
        .filter(|org| !org.is_empty())
        .map(str::to_string);
    let organization_id = match (v1, v2) {
        (Some(a), Some(b)) if a != b => return Err(invalid("conflicting organization claims")),
        (Some(org), _) | (None, Some(org)) => org,
        (None, None) => return Err(invalid("the session has no active organization")),
    };
    Ok(Principal {
        organization_id,
        project_id: None,
        credential: CredentialKind::Session { user_id },
    })
}

/// Test support shared with the integration tests: an RSA issuer that serves a JWKS and signs
/// tokens, plus hostile tokens. Not for production use.
#[doc(hidden)]
pub mod testing {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rsa::{KeyPair, KeySize};
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::{Value, json};

    /// An RS256 signing key with a key id.
    pub struct TestIssuer {
        kid: String,
        key: EncodingKey,
        jwk: Jwk,
    }

    impl TestIssuer {
        /// A fresh 2048-bit RSA key named `kid`.
        pub fn new(kid: &str) -> Self {
            let pair = KeyPair::generate(KeySize::Rsa2048).expect("RSA key generation works");
            let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).expect("the key encodes");
            let body = STANDARD.encode(pkcs8.as_ref());
            let lines: Vec<&str> = body
                .as_bytes()
                .chunks(64)
                .map(|line| std::str::from_utf8(line).expect("base64 is ASCII"))
                .collect();
            let pem = format!(
                "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
                lines.join("\n")
            );
            let key = EncodingKey::from_rsa_pem(pem.as_bytes()).expect("the PEM parses");
            let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).expect("the public key derives");
            jwk.common.key_id = Some(kid.to_string());
            jwk.common.public_key_use = Some(PublicKeyUse::Signature);
            TestIssuer {
                kid: kid.to_string(),
                key,
                jwk,
            }
        }

        /// The key id.
        pub fn kid(&self) -> &str {
            &self.kid
        }

        /// The public key as a JWK.
        pub fn jwk(&self) -> Value {
            serde_json::to_value(&self.jwk).expect("a JWK serializes")
        }

        /// A JWKS document holding this issuer's public key.
        pub fn jwks_json(&self) -> String {
            jwks_json_of(&[self])
        }

        /// A token over `claims` signed by this key, naming this key's id.
        pub fn token(&self, claims: &Value) -> String {
            self.token_with_kid(&self.kid, claims)
        }

        /// A token over `claims` signed by this key but naming `kid`.
        pub fn token_with_kid(&self, kid: &str, claims: &Value) -> String {
            let mut header = Header::new(Algorithm::RS256);
            header.kid = Some(kid.to_string());
            jsonwebtoken::encode(&header, claims, &self.key).expect("signing works")
        }

        /// An HS256 token over `claims`, MACed with a fixed secret, no `kid`.
        pub fn hs256_token(claims: &Value) -> String {
            let secret = EncodingKey::from_secret(b"not-an-rsa-key").expect("any bytes are an HMAC key");
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &secret).expect("signing works")
        }

        /// An HS256 token naming this key's id, MACed with the public modulus (the classic
        /// algorithm-confusion attack).
        pub fn hs256_confusion_token(&self, claims: &Value) -> String {
            let AlgorithmParameters::RSA(rsa) = &self.jwk.algorithm else {
                unreachable!("the test issuer holds an RSA key")
            };
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some(self.kid.clone());
            let secret = EncodingKey::from_secret(rsa.n.as_bytes()).expect("any bytes are an HMAC key");
            jsonwebtoken::encode(&header, claims, &secret).expect("signing works")
        }

        /// An unsigned token: header `{"alg":"none","typ":"JWT"}`, the claims, an empty signature.
        pub fn none_token(claims: &Value) -> String {
            let header = json!({"alg": "none", "typ": "JWT"});
            format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            )
        }

        /// [`TestIssuer::none_token`] naming this key's id.
        pub fn none_token_with_kid(&self, claims: &Value) -> String {
            let header = json!({"alg": "none", "typ": "JWT", "kid": self.kid});
            format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            )
        }
    }

    /// A JWKS document holding the public keys of `issuers`.
    pub fn jwks_json_of(issuers: &[&TestIssuer]) -> String {
        json!({ "keys": issuers.iter().map(|issuer| issuer.jwk()).collect::<Vec<_>>() }).to_string()
    }

    /// Claims of a session token valid for five minutes: `iss`, `sub`, `iat`, `nbf`, `exp`, `azp`,
    /// `sid` and, when given, the v1 active-organization claim `org_id`.
    pub fn session_claims(issuer: &str, user_id: &str, org_id: Option<&str>) -> Value {
        let now = jiff::Timestamp::now().as_second();
        let mut claims = json!({
            "iss": issuer,
            "sub": user_id,
            "sid": "sess_test",
            "azp": "https://app.example.test",
            "iat": now,
            "nbf": now - 5,
            "exp": now + 300,
        });
        if let Some(org) = org_id {
            claims["org_id"] = json!(org);
        }
        claims
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use tempfile::TempDir;

    use super::testing::{TestIssuer, jwks_json_of, session_claims};
    use super::*;

    const ISSUER: &str = "https://clerk.example.test";

    struct Fixture {
        dir: TempDir,
        issuer: TestIssuer,
        verifier: ClerkVerifier,
    }

    impl Fixture {
        async fn new(configure: impl FnOnce(&mut ClerkConfig)) -> Fixture {
            let issuer = TestIssuer::new("kid-1");
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("jwks.json"), issuer.jwks_json()).unwrap();
            let mut config = ClerkConfig::new(JwksSource::File(dir.path().join("jwks.json")), ISSUER);
            configure(&mut config);
            let verifier = ClerkVerifier::new(config, reqwest::Client::new()).await.unwrap();
            Fixture { dir, issuer, verifier }
        }

        async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
            let result = self.verifier.verify(token).await;
            if let Err(error) = &result {
                assert!(!error.to_string().contains(token));
            }
            result
        }
    }

    fn claims() -> Value {
        session_claims(ISSUER, "user_1", Some("org_1"))
    }

    fn now() -> i64 {
        jiff::Timestamp::now().as_second()
    }

    fn session(org: &str) -> Principal {
        Principal {
            organization_id: org.to_string(),
            project_id: None,
            credential: CredentialKind::Session {
                user_id: "user_1".to_string(),
            },
        }
    }

    fn rejected(reason: &str) -> Result<Principal, AuthError> {
        Err(AuthError::InvalidToken(reason.to_string()))
    }

    #[tokio::test]
    async fn accepts_v1_and_v2_tokens() {
        let f = Fixture::new(|_| {}).await;
        assert_eq!(f.verify(&f.issuer.token(&claims())).await, Ok(session("org_1")));

        let mut v2 = session_claims(ISSUER, "user_1", None);
        v2["v"] = json!(2);
        v2["o"] = json!({"id": "org_2", "rol": "admin", "slg": "acme"});
        assert_eq!(f.verify(&f.issuer.token(&v2)).await, Ok(session("org_2")));
        assert_eq!(f.verifier.jwks_loads(), 1);
    }

    #[tokio::test]
    async fn checks_exp_and_nbf_with_leeway() {
        let f = Fixture::new(|_| {}).await;
        let mut expired = claims();
        expired["exp"] = json!(now() - 60);
        assert_eq!(f.verify(&f.issuer.token(&expired)).await, rejected("token expired"));

        let mut early = claims();
        early["nbf"] = json!(now() + 60);
        assert_eq!(f.verify(&f.issuer.token(&early)).await, rejected("token not yet valid"));

        let mut just_expired = claims();
        just_expired["exp"] = json!(now() - 2);
        assert_eq!(f.verify(&f.issuer.token(&just_expired)).await, Ok(session("org_1")));

        let mut no_exp = claims();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(f.verify(&f.issuer.token(&no_exp)).await, rejected("missing claim exp"));
    }

    #[tokio::test]
    async fn checks_the_issuer_and_subject() {
        let f = Fixture::new(|_| {}).await;
        let mut wrong = claims();
        wrong["iss"] = json!("https://evil.example.test");
        assert_eq!(f.verify(&f.issuer.token(&wrong)).await, rejected("wrong issuer"));

        let mut no_sub = claims();
        no_sub.as_object_mut().unwrap().remove("sub");
        assert_eq!(f.verify(&f.issuer.token(&no_sub)).await, rejected("missing claim sub"));

        let mut aud = claims();
        aud["aud"] = json!("another-service");
        assert_eq!(f.verify(&f.issuer.token(&aud)).await, rejected("unexpected audience"));
    }

    #[tokio::test]
    async fn refuses_unknown_and_wrong_keys() {
        let f = Fixture::new(|_| {}).await;
        assert_eq!(
            f.verify(&f.issuer.token_with_kid("kid-9", &claims())).await,
            rejected("unknown signing key")
        );

        let impostor = TestIssuer::new("kid-1");
        assert_eq!(f.verify(&impostor.token(&claims())).await, rejected("bad signature"));

        let mut tampered = f.issuer.token(&claims());
        let mut parts: Vec<String> = tampered.split('.').map(str::to_string).collect();
        let mut other = claims();
        other["org_id"] = json!("org_evil");
        parts[1] = URL_SAFE_NO_PAD.encode(other.to_string());
        tampered = parts.join(".");
        assert_eq!(f.verify(&tampered).await, rejected("bad signature"));

        let no_kid = {
            let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#);
            let token = f.issuer.token(&claims());
            let rest = token.split_once('.').unwrap().1.to_string();
            format!("{header}.{rest}")
        };
        assert_eq!(f.verify(&no_kid).await, rejected("missing key id"));
    }

    #[tokio::test]
    async fn refuses_other_algorithms() {
        let f = Fixture::new(|_| {}).await;
        for token in [
            TestIssuer::hs256_token(&claims()),
            f.issuer.hs256_confusion_token(&claims()),
            TestIssuer::none_token(&claims()),
            f.issuer.none_token_with_kid(&claims()),
        ] {
            assert_eq!(f.verify(&token).await, rejected("unsupported algorithm"));
        }
        let none_upper = {
            let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"None","kid":"kid-1"}"#);
            format!("{header}.{}.", URL_SAFE_NO_PAD.encode(claims().to_string()))
        };
        assert_eq!(f.verify(&none_upper).await, rejected("unsupported algorithm"));
        assert_eq!(f.verify("not.a.jwt").await, rejected("malformed token"));
        // No key lookup, hence no reload, for any of these.
        assert_eq!(f.verifier.jwks_loads(), 1);
    }

    #[tokio::test]
    async fn checks_authorized_parties() {
        let f = Fixture::new(|c| c.authorized_parties = vec!["https://app.example.test".into()]).await;
        assert_eq!(f.verify(&f.issuer.token(&claims())).await, Ok(session("org_1")));
        let mut other = claims();
        other["azp"] = json!("https://evil.example.test");
        assert_eq!(f.verify(&f.issuer.token(&other)).await, rejected("unauthorized party"));
        other.as_object_mut().unwrap().remove("azp");
        assert_eq!(f.verify(&f.issuer.token(&other)).await, rejected("unauthorized party"));
    }

    #[tokio::test]
    async fn requires_an_active_organization() {
        let f = Fixture::new(|_| {}).await;
        let none = session_claims(ISSUER, "user_1", None);
        assert_eq!(
            f.verify(&f.issuer.token(&none)).await,
            rejected("the session has no active organization")
        );
        let mut empty = none.clone();
        empty["o"] = json!({"rol": "admin"});
        assert_eq!(
            f.verify(&f.issuer.token(&empty)).await,
            rejected("the session has no active organization")
        );
        let mut both = claims();
        both["o"] = json!({"id": "org_2"});
        assert_eq!(
            f.verify(&f.issuer.token(&both)).await,
            rejected("conflicting organization claims")
        );
    }

    #[tokio::test]
    async fn reloads_on_unknown_kid_at_most_once_per_interval() {
        let f = Fixture::new(|_| {}).await;
        let rotated = TestIssuer::new("kid-2");
        std::fs::write(f.dir.path().join("jwks.json"), jwks_json_of(&[&f.issuer, &rotated])).unwrap();

        assert_eq!(f.verify(&rotated.token(&claims())).await, Ok(session("org_1")));
        assert_eq!(f.verifier.jwks_loads(), 2);
        // Known kids never reload.
        assert_eq!(f.verify(&f.issuer.token(&claims())).await, Ok(session("org_1")));
        assert_eq!(f.verify(&rotated.token(&claims())).await, Ok(session("org_1")));
        assert_eq!(f.verifier.jwks_loads(), 2);

        // Unknown kids within the interval do not reload, even when the file has the key.
        let third = TestIssuer::new("kid-3");
        std::fs::write(f.dir.path().join("jwks.json"), jwks_json_of(&[&third])).unwrap();
        for _ in 0..5 {
            assert_eq!(f.verify(&third.token(&claims())).await, rejected("unknown signing key"));
        }
        assert_eq!(f.verifier.jwks_loads(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn reloads_again_after_the_interval_and_survives_a_broken_source() {
        let f = Fixture::new(|c| c.min_refresh_interval = Duration::from_secs(1)).await;
        let path = f.dir.path().join("jwks.json");
        std::fs::write(&path, "{ not json").unwrap();
        let rotated = TestIssuer::new("kid-2");
        assert!(matches!(
            f.verify(&rotated.token(&claims())).await,
            Err(AuthError::JwksUnavailable(_))
        ));
        // The keys loaded before keep working.
        assert_eq!(f.verify(&f.issuer.token(&claims())).await, Ok(session("org_1")));
        // Within the interval the failure is remembered, without another read.
        assert!(matches!(
            f.verify(&rotated.token(&claims())).await,
            Err(AuthError::JwksUnavailable(_))
        ));
        assert_eq!(f.verifier.jwks_loads(), 2);

        tokio::time::advance(Duration::from_millis(1100)).await;
        std::fs::write(&path, rotated.jwks_json()).unwrap();
        assert_eq!(f.verify(&rotated.token(&claims())).await, Ok(session("org_1")));
        assert_eq!(f.verifier.jwks_loads(), 3);
    }

    #[tokio::test]
    async fn a_source_that_cannot_load_fails_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let missing = ClerkConfig::new(JwksSource::File(dir.path().join("absent.json")), ISSUER);
        let err = ClerkVerifier::new(missing, reqwest::Client::new()).await.unwrap_err();
        assert_eq!(err.status_code(), 503);

        std::fs::write(dir.path().join("empty.json"), r#"{"keys": []}"#).unwrap();
        let empty = ClerkConfig::new(JwksSource::File(dir.path().join("empty.json")), ISSUER);
        assert!(ClerkVerifier::new(empty, reqwest::Client::new()).await.is_err());

        // A closed local port: connection refused, no real network.
        let unreachable = ClerkConfig::new(JwksSource::Url("http://127.0.0.1:9/jwks.json".into()), ISSUER);
        assert!(matches!(
            ClerkVerifier::new(unreachable, reqwest::Client::new()).await,
            Err(AuthError::JwksUnavailable(_))
        ));
    }

    #[test]
    fn jwks_parsing_keeps_only_rs256_signing_keys() {
        let issuer = TestIssuer::new("rsa");
        let mut enc = issuer.jwk();
        enc["kid"] = json!("enc");
        enc["use"] = json!("enc");
        let mut no_kid = issuer.jwk();
        no_kid.as_object_mut().unwrap().remove("kid");
        let doc = json!({"keys": [
            issuer.jwk(),
            enc,
            no_kid,
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "weird", "kid": "x"},
        ]});
        let keys = parse_jwks(doc.to_string().as_bytes()).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), vec!["rsa"]);
        assert!(parse_jwks(b"[]").is_err());
    }

    #[test]
    fn required_roles_refuse_other_members() {
        let claims = |v: serde_json::Value| -> SessionClaims { serde_json::from_value(v).unwrap() };
        let admins = ["org:admin".to_string()];
        let v1_admin = claims(json!({"sub": "u", "org_id": "org_1", "org_role": "org:admin"}));
        assert!(principal_from_claims(v1_admin, &[], &admins).is_ok());
        let v2_admin = claims(json!({"sub": "u", "o": {"id": "org_1", "rol": "admin"}}));
        assert!(principal_from_claims(v2_admin, &[], &admins).is_ok());
        for member in [
            json!({"sub": "u", "org_id": "org_1", "org_role": "org:member"}),
            json!({"sub": "u", "o": {"id": "org_1", "rol": "member"}}),
            json!({"sub": "u", "org_id": "org_1"}),
        ] {
            let err = principal_from_claims(claims(member.clone()), &[], &admins).unwrap_err();
            assert_eq!(err.status_code(), 403, "{member}");
            assert!(err.to_string().contains("org:admin"), "{err}");
            // Without required roles, every member is in, as before.
            assert!(principal_from_claims(claims(member), &[], &[]).is_ok());
        }
    }

    #[test]
    fn jwks_urls_must_be_https_unless_http_is_allowed() {
        assert!(check_jwks_url("https://clerk.example.com/.well-known/jwks.json", false).is_ok());
        assert!(check_jwks_url("http://clerk.example.com/jwks.json", false).is_err());
        assert!(check_jwks_url("http://127.0.0.1:8080/jwks.json", true).is_ok());
        assert!(check_jwks_url("file:///etc/jwks.json", true).is_err());
    }

    #[tokio::test]
    async fn the_jwks_client_follows_no_redirect() {
        use warp::Filter;
        let issuer = TestIssuer::new("kid-redirect");
        let jwks = issuer.jwks_json();
        let routes = warp::path!("jwks.json")
            .map(move || warp::reply::with_header(jwks.clone(), "content-type", "application/json"))
            .or(warp::path!("moved").map(|| {
                warp::reply::with_header(
                    warp::reply::with_status("", warp::http::StatusCode::FOUND),
                    "location",
                    "/jwks.json",
                )
            }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(routes).incoming(listener).run());
        let direct = ClerkConfig::new(JwksSource::Url(format!("http://{addr}/jwks.json")), ISSUER);
        assert!(
            ClerkVerifier::new(direct, jwks_http_client().unwrap()).await.is_ok(),
            "control: the keys load directly"
        );
        let moved = ClerkConfig::new(JwksSource::Url(format!("http://{addr}/moved")), ISSUER);
        assert!(matches!(
            ClerkVerifier::new(moved, jwks_http_client().unwrap()).await,
            Err(AuthError::JwksUnavailable(_))
        ));
    }
}
