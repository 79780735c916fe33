//! Sends one signed delivery attempt to a customer URL.
//!
//! One [`Sender`] holds one `reqwest::Client` shared by every endpoint, so connections to a
//! receiver are kept alive across deliveries, and one more per distinct client certificate
//! (mutual TLS: [`Sender::send_as`]), made on first use and cached. Each attempt:
//!
//! 1. checks the URL ([`check_target_url`]): `https` (or `http` when allowed), no credentials,
//!    and an IP-literal host must pass the SSRF policy;
//! 2. signs `{msg_id}.{timestamp}.{body}` with every secret of the key ring still in its grace
//!    period (Standard Webhooks headers `webhook-id`, `webhook-timestamp`, `webhook-signature`);
//! 3. sends the request. A host name is resolved once by the client's DNS resolver, a
//!    [`GuardedResolver`] that checks every address with [`ssrf::check_all`] and hands the client
//!    exactly the checked addresses, so the connection goes to a checked address and DNS
//!    rebinding cannot swap another one in. Redirects are never followed (a 3xx is a failure) and
//!    no proxy from the environment is used, so neither can route around the guard. With an
//!    egress proxy (`--egress-proxy`, [`super::egress`]) the same check runs in the tunnel's
//!    connector, and the proxy is asked to `CONNECT` to the checked address;
//! 4. classifies the status with [`classify`] (honouring `Retry-After` on 429 and 503) and reads
//!    at most `max_response_bytes` of the body for the delivery log.
//!
//! Once a status has been received, the attempt is classified by that status even if reading the
//! body then fails or times out: the receiver has answered.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use jiff::Timestamp;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use url::{Host, Url};

use crate::client_certificate::ClientIdentity;
use crate::delivery::egress::{self, ConnectTimedOut, EgressProxy, ProxyError, TunnelConnector};
use crate::delivery::outcome::{AttemptOutcome, classify};
use crate::delivery::schedule::parse_retry_after;
use crate::delivery::ssrf::{self, TargetPolicy};
use crate::signing::KeyRing;
use crate::validation::{UrlPolicy, validate_url};

/// The `user-agent` of every delivery.
pub const USER_AGENT: &str = concat!(
    "capy-webhooks/",
    env!("CARGO_PKG_VERSION"),
    " (+https://capydb.io/webhooks)"
);

/// Longest connection-error text kept in an [`AttemptOutcome::ConnectError`].
const MAX_ERROR_CHARS: usize = 300;

/// How the [`Sender`] connects and how much of a response it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderConfig {
    /// Time allowed to resolve the host and establish the connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Time allowed for the whole attempt, from connecting to the end of the body read.
    pub total_timeout: Duration,
    /// Which address classes a target may resolve to.
    pub policy: TargetPolicy,
    /// Allow plain `http://` targets (tests and in-cluster receivers only).
    pub allow_http: bool,
    /// Response bodies are read up to this many bytes, never further.
    pub max_response_bytes: usize,
    /// Idle keep-alive connections kept per receiver host. Many endpoints often share a host
    /// (one customer's, or a SaaS receiver's), each with up to `--per-endpoint-concurrency`
    /// attempts in flight: a pool smaller than that closes connections only to open them again
    /// on the next burst (at 100 endpoints on one host, connecting was about 40 % of the
    /// operator's CPU per delivery). Idle connections still close after 90 s.
    pub pool_idle_per_host: usize,
    /// Certificate authorities (PEM) trusted for receivers besides the system's roots
    /// (`--receiver-ca-file`): receivers inside the cluster or behind a private CA. Empty: none.
    pub extra_roots_pem: Vec<u8>,
    /// Every attempt goes through this HTTP CONNECT proxy (`--egress-proxy`), tunnelled to the
    /// checked address; `None`: straight to the receiver.
    pub egress_proxy: Option<EgressProxy>,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(15),
            policy: TargetPolicy::default(),
            allow_http: false,
            max_response_bytes: 1024,
            pool_idle_per_host: 1024,
            extra_roots_pem: Vec::new(),
            egress_proxy: None,
        }
    }
}

/// What one attempt produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptResult {
    /// How the attempt ended.
    pub outcome: AttemptOutcome,
    /// The first `max_response_bytes` of the response body (lossy UTF-8, cut at a character
    /// boundary so it never exceeds the cap), for the delivery log; `None` without a response
    /// or with an empty body.
    pub response_excerpt: Option<String>,
    /// Wall time of the attempt.
    pub duration: Duration,
}

/// Clients with a client certificate kept at most; beyond it the cache starts over (an endpoint's
/// renewed certificate is a new identity, so old ones would otherwise pile up).
const MAX_IDENTITY_CLIENTS: usize = 256;

/// A [`Sender`]'s client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    #[error("{0}")]
    Tls(String),
}

/// The keep-alive client attempts go through: reqwest straight to the receiver, or hyper-util's
/// pooled client through the egress proxy's tunnel (the same hyper 1 stack underneath).
#[derive(Clone)]
enum Client {
    Direct(reqwest::Client),
    Tunnelled(Arc<HyperClient<TunnelConnector, Full<Bytes>>>),
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Client::Direct(_) => "Client::Direct",
            Client::Tunnelled(_) => "Client::Tunnelled",
        })
    }
}

/// Sends signed delivery attempts through keep-alive HTTP clients. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Sender {
    client: Client,
    config: Arc<SenderConfig>,
    /// One client per distinct client certificate, by [`ClientIdentity::fingerprint`].
    with_identity: Arc<Mutex<HashMap<[u8; 32], Client>>>,
}

impl Sender {
    /// Builds the HTTP client: SSRF-guarded resolver, no redirects, no proxies from the
    /// environment (only `egress_proxy`, tunnelled to checked addresses), keep-alive pool.
    pub fn new(config: SenderConfig) -> Result<Self, BuildError> {
        let client = build_client(&config, None)?;
        Ok(Self {
            client,
            config: Arc::new(config),
            with_identity: Arc::default(),
        })
    }

    /// The client that presents `identity`, made on first use.
    fn client_for(&self, identity: &ClientIdentity) -> Result<Client, BuildError> {
        let mut clients = self.with_identity.lock().expect("client cache lock");
        if let Some(client) = clients.get(&identity.fingerprint()) {
            return Ok(client.clone());
        }
        let client = build_client(&self.config, Some(identity))?;
        if clients.len() >= MAX_IDENTITY_CLIENTS {
            clients.clear();
        }
        clients.insert(identity.fingerprint(), client.clone());
        Ok(client)
    }

    /// Sends one attempt of a delivery.
    ///
    /// `now` is the attempt time; `webhook-timestamp` = `now` in Unix seconds; the signature
    /// covers `{msg_id}.{timestamp}.{body}`. Never fails: every problem is an [`AttemptOutcome`].
    pub async fn send(&self, url: &str, msg_id: &str, body: &[u8], ring: &KeyRing, now: Timestamp) -> AttemptResult {
        self.send_with_headers(url, &BTreeMap::new(), msg_id, body, ring, now)
            .await
    }

    /// [`Self::send`] with the endpoint's custom headers besides the signature headers. A header
    /// that is not valid HTTP refuses the attempt (naming the header, never its value); the
    /// values are marked sensitive so no debug output of the request shows them.
    pub async fn send_with_headers(
        &self,
        url: &str,
        headers: &BTreeMap<String, String>,
        msg_id: &str,
        body: &[u8],
        ring: &KeyRing,
        now: Timestamp,
    ) -> AttemptResult {
        self.send_as(None, url, headers, msg_id, body, ring, now).await
    }

    /// [`Self::send_with_headers`] presenting `identity`'s client certificate when the receiver
    /// asks for one (mutual TLS), through the client kept for that identity.
    #[allow(clippy::too_many_arguments)]
    pub async fn send_as(
        &self,
        identity: Option<&ClientIdentity>,
        url: &str,
        headers: &BTreeMap<String, String>,
        msg_id: &str,
        body: &[u8],
        ring: &KeyRing,
        now: Timestamp,
    ) -> AttemptResult {
        let started = Instant::now();
        let client = match identity.map(|i| self.client_for(i)).transpose() {
            Ok(client) => client.unwrap_or_else(|| self.client.clone()),
            Err(_) => {
                return AttemptResult {
                    outcome: AttemptOutcome::Refused("the client certificate could not be loaded".into()),
                    response_excerpt: None,
                    duration: started.elapsed(),
                };
            }
        };
        let (outcome, response_excerpt) = match custom_headers(headers) {
            Ok(custom) => {
                self.attempt(&client, url, custom, msg_id, body, ring, now, started)
                    .await
            }
            Err(reason) => (AttemptOutcome::Refused(reason), None),
        };
        AttemptResult {
            outcome,
            response_excerpt,
            duration: started.elapsed(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        client: &Client,
        url: &str,
        custom: HeaderMap,
        msg_id: &str,
        body: &[u8],
        ring: &KeyRing,
        now: Timestamp,
        started: Instant,
    ) -> (AttemptOutcome, Option<String>) {
        let target = match check_target_url(url, self.config.allow_http, self.config.policy) {
            Ok(target) => target,
            Err(reason) => return (AttemptOutcome::Refused(reason), None),
        };
        let host = target.host_str().unwrap_or_default().to_string();
        let timestamp = now.as_second();
        let signature = ring.signature_header(now, msg_id, timestamp, body);
        let client = match client {
            Client::Direct(client) => client,
            Client::Tunnelled(client) => {
                let mut headers = custom;
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                headers.insert(reqwest::header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
                headers.insert(reqwest::header::ACCEPT, HeaderValue::from_static("*/*"));
                let signed = [
                    ("webhook-id", msg_id.to_string()),
                    ("webhook-timestamp", timestamp.to_string()),
                    ("webhook-signature", signature),
                ];
                for (name, value) in signed {
                    match HeaderValue::try_from(value) {
                        Ok(value) => headers.insert(name, value),
                        Err(_) => return (AttemptOutcome::Refused(format!("the {name} header is not valid")), None),
                    };
                }
                return self
                    .attempt_tunnelled(client, &target, &host, headers, body, now, started)
                    .await;
            }
        };
        let request = client
            .post(target)
            .headers(custom)
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", msg_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body.to_vec());
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(err) => return (error_outcome(&err, &host), None),
        };
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers(), now, started);
        let excerpt = read_excerpt(&mut response, self.config.max_response_bytes).await;
        (classify(status, retry_after), excerpt)
    }

    /// [`Self::attempt`]'s request through the egress proxy's tunnel, with the same timeouts:
    /// the connect timeout in the connector, the total timeout over the request and the body
    /// read (a status already received is kept when the body read runs out of time).
    #[allow(clippy::too_many_arguments)]
    async fn attempt_tunnelled(
        &self,
        client: &HyperClient<TunnelConnector, Full<Bytes>>,
        target: &Url,
        host: &str,
        headers: HeaderMap,
        body: &[u8],
        now: Timestamp,
        started: Instant,
    ) -> (AttemptOutcome, Option<String>) {
        let mut request = http::Request::new(Full::new(Bytes::copy_from_slice(body)));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = match target.as_str().parse() {
            Ok(uri) => uri,
            Err(_) => {
                return (
                    AttemptOutcome::Refused("the webhook URL is not a valid request URI".into()),
                    None,
                );
            }
        };
        *request.headers_mut() = headers;
        let deadline = tokio::time::Instant::from_std(started) + self.config.total_timeout;
        let response = match tokio::time::timeout_at(deadline, client.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => return (tunnel_error_outcome(&err, host), None),
            Err(_) => return (AttemptOutcome::Timeout, None),
        };
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers(), now, started);
        let cap = self.config.max_response_bytes;
        let mut body = response.into_body();
        let mut buf = Vec::new();
        let read = async {
            while buf.len() < cap {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(chunk) = frame.into_data() {
                            let take = chunk.len().min(cap - buf.len());
                            buf.extend_from_slice(&chunk[..take]);
                        }
                    }
                    Some(Err(_)) | None => break,
                }
            }
        };
        let _ = tokio::time::timeout_at(deadline, read).await;
        (classify(status, retry_after), excerpt_text(&buf, cap))
    }
}

/// The client of `config`: through the egress proxy's tunnel when one is set, else reqwest
/// straight to the receiver; presenting `identity` when given.
fn build_client(config: &SenderConfig, identity: Option<&ClientIdentity>) -> Result<Client, BuildError> {
    let Some(proxy) = &config.egress_proxy else {
        return Ok(Client::Direct(build_direct(config, identity)?));
    };
    let tls = egress::tls_config(&config.extra_roots_pem, identity).map_err(BuildError::Tls)?;
    let connector = TunnelConnector::new(proxy.clone(), config.policy, Arc::new(tls), config.connect_timeout);
    let client = HyperClient::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(config.pool_idle_per_host)
        .build(connector);
    Ok(Client::Tunnelled(Arc::new(client)))
}

/// A reqwest client of `config`: SSRF-guarded resolver, no redirects, no proxies, keep-alive
/// pool, the extra receiver roots; presenting `identity` when given.
fn build_direct(config: &SenderConfig, identity: Option<&ClientIdentity>) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .timeout(config.total_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .https_only(!config.allow_http)
        .pool_max_idle_per_host(config.pool_idle_per_host)
        .user_agent(USER_AGENT)
        .dns_resolver(GuardedResolver { policy: config.policy });
    if !config.extra_roots_pem.is_empty() {
        builder = builder.tls_certs_merge(reqwest::Certificate::from_pem_bundle(&config.extra_roots_pem)?);
    }
    if let Some(identity) = identity {
        builder = builder.identity(reqwest::Identity::from_pem(identity.pem())?);
    }
    builder.build()
}

/// The answer's `Retry-After`; an HTTP date is measured from when the answer arrived
/// (`now` + the time since the attempt `started`).
fn retry_after(headers: &HeaderMap, now: Timestamp, started: Instant) -> Option<Duration> {
    let answered_at = now.checked_add(started.elapsed()).unwrap_or(now);
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, answered_at))
}

/// The endpoint's custom headers as a header map, values marked sensitive.
fn custom_headers(headers: &BTreeMap<String, String>) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("custom header {name:?} is not a valid header name"))?;
        let mut value =
            HeaderValue::from_str(value).map_err(|_| format!("the value of custom header {name} is not valid"))?;
        value.set_sensitive(true);
        map.insert(name, value);
    }
    Ok(map)
}

/// Checks a webhook URL before any connection: the endpoint URL rules of
/// [`validate_url`] (scheme, host, no credentials, length), and an IP-literal host must pass
/// `policy`. Host names
/// are checked when they are resolved, by the sender's resolver. The error says why, without
/// repeating the URL.
pub fn check_target_url(url: &str, allow_http: bool, policy: TargetPolicy) -> Result<Url, String> {
    let target = validate_url(url, UrlPolicy { allow_http })?;
    match target.host() {
        Some(Host::Ipv4(ip)) => ssrf::check_address(IpAddr::V4(ip), policy)?,
        Some(Host::Ipv6(ip)) => ssrf::check_address(IpAddr::V6(ip), policy)?,
        Some(Host::Domain(_)) | None => {}
    }
    Ok(target)
}

/// The Standard Webhooks envelope `{"type", "timestamp", "data"}`; the timestamp is RFC 3339 in
/// UTC with a `Z`.
pub fn envelope(event_type: &str, timestamp: Timestamp, data: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "type": event_type,
        "timestamp": timestamp.to_string(),
        "data": data,
    })
}

/// The resolver refused a host because one of its addresses is not an allowed target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TargetRefused {
    host: String,
    reason: String,
}

impl fmt::Display for TargetRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} resolves to a refused address: {}", self.host, self.reason)
    }
}

impl StdError for TargetRefused {}

/// The client's DNS resolver: resolves a host once with the system resolver, checks every
/// address, and returns exactly those addresses for the client to connect to (or fails with
/// [`TargetRefused`]). IP-literal hosts never reach it; [`check_target_url`] checks them.
#[derive(Debug, Clone, Copy)]
struct GuardedResolver {
    policy: TargetPolicy,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = resolve_checked(&host, 0, policy).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Resolves `host` once with the system resolver and checks every address with
/// [`ssrf::check_all`]: exactly the checked addresses (with `port`), or [`TargetRefused`].
pub(crate) async fn resolve_checked(
    host: &str,
    port: u16,
    policy: TargetPolicy,
) -> Result<Vec<SocketAddr>, Box<dyn StdError + Send + Sync>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    let ips: Vec<IpAddr> = addrs.iter().map(SocketAddr::ip).collect();
    ssrf::check_all(&ips, policy).map_err(|reason| TargetRefused {
        host: host.to_string(),
        reason,
    })?;
    Ok(addrs)
}

/// Maps a failed tunnelled request to an outcome, as [`error_outcome`] does for reqwest's: the
/// guard's refusal, a connect timeout, the proxy's failure (a retryable connection error that
/// names the proxy's answer, never its address or credentials), or the innermost cause.
fn tunnel_error_outcome(err: &hyper_util::client::legacy::Error, host: &str) -> AttemptOutcome {
    let mut source = err.source();
    let mut innermost: Option<&(dyn StdError + 'static)> = None;
    while let Some(e) = source {
        if let Some(refused) = e.downcast_ref::<TargetRefused>() {
            return AttemptOutcome::Refused(refused.to_string());
        }
        if e.is::<ConnectTimedOut>() {
            return AttemptOutcome::Timeout;
        }
        if let Some(proxy) = e.downcast_ref::<ProxyError>() {
            return AttemptOutcome::ConnectError(format!("connection to {host} failed: {proxy}"));
        }
        innermost = Some(e);
        source = e.source();
    }
    let what = if err.is_connect() {
        "connection to"
    } else {
        "request to"
    };
    connect_error(what, host, innermost)
}

/// Maps a failed request to an outcome: the resolver's refusal, a timeout, or a short
/// connection-error text naming the host and the innermost cause (never the URL).
fn error_outcome(err: &reqwest::Error, host: &str) -> AttemptOutcome {
    let mut source = err.source();
    let mut innermost: Option<&(dyn StdError + 'static)> = None;
    while let Some(e) = source {
        if let Some(refused) = e.downcast_ref::<TargetRefused>() {
            return AttemptOutcome::Refused(refused.to_string());
        }
        // reqwest's own errors print the URL, query string included; skip them.
        if !e.is::<reqwest::Error>() {
            innermost = Some(e);
        }
        source = e.source();
    }
    if err.is_timeout() {
        return AttemptOutcome::Timeout;
    }
    let what = if err.is_connect() {
        "connection to"
    } else if err.is_body() || err.is_decode() {
        "reading the response from"
    } else {
        "request to"
    };
    connect_error(what, host, innermost)
}

/// `{what} {host} failed: {cause}`, cut to [`MAX_ERROR_CHARS`].
fn connect_error(what: &str, host: &str, cause: Option<&(dyn StdError + 'static)>) -> AttemptOutcome {
    let mut message = match cause {
        Some(cause) => format!("{what} {host} failed: {cause}"),
        None => format!("{what} {host} failed"),
    };
    if let Some((cut, _)) = message.char_indices().nth(MAX_ERROR_CHARS) {
        message.truncate(cut);
    }
    AttemptOutcome::ConnectError(message)
}

/// Reads at most `cap` bytes of the body, chunk by chunk, stopping as soon as the cap is reached
/// (or the body ends or fails). A body that ends within the cap is read to its end, so the
/// connection goes back to the keep-alive pool.
async fn read_excerpt(response: &mut reqwest::Response, cap: usize) -> Option<String> {
    let mut buf = Vec::new();
    while buf.len() < cap {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let take = chunk.len().min(cap - buf.len());
                buf.extend_from_slice(&chunk[..take]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    excerpt_text(&buf, cap)
}

/// Lossy UTF-8 of `bytes`, cut at a character boundary to at most `cap` bytes (replacement
/// characters are longer than the bytes they replace); `None` when nothing is left.
fn excerpt_text(bytes: &[u8], cap: usize) -> Option<String> {
    if bytes.is_empty() {
        return None;
    }
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    if text.len() > cap {
        let mut end = cap;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    (!text.is_empty()).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::SigningSecret;

    const PRIVATE: TargetPolicy = TargetPolicy {
        allow_private: true,
        allow_metadata: false,
    };

    fn ring() -> KeyRing {
        KeyRing {
            current: SigningSecret::generate(),
            rotation: 0,
            previous: vec![],
        }
    }

    fn sender(allow_http: bool, policy: TargetPolicy) -> Sender {
        Sender::new(SenderConfig {
            allow_http,
            policy,
            ..SenderConfig::default()
        })
        .unwrap()
    }

    async fn refusal(sender: &Sender, url: &str) -> String {
        let result = sender.send(url, "msg_1", b"{}", &ring(), Timestamp::now()).await;
        assert_eq!(result.response_excerpt, None);
        match result.outcome {
            AttemptOutcome::Refused(reason) => reason,
            other => panic!("{url}: expected Refused, got {other:?}"),
        }
    }

    #[test]
    fn envelope_has_the_standard_webhooks_shape() {
        let ts: Timestamp = "2026-11-03T20:26:10Z".parse().unwrap();
        let data = serde_json::json!({"id": "db_1", "nested": {"n": 2}});
        assert_eq!(
            envelope("database.created", ts, &data),
            serde_json::json!({
                "type": "database.created",
                "timestamp": "2026-11-03T20:26:10Z",
                "data": {"id": "db_1", "nested": {"n": 2}},
            })
        );
        let fractional = Timestamp::from_millisecond(1_793_737_570_344).unwrap();
        let value = envelope("x", fractional, &serde_json::Value::Null);
        let text = value["timestamp"].as_str().unwrap();
        assert!(text.ends_with('Z'), "{text}");
        assert_eq!(text.parse::<Timestamp>().unwrap(), fractional);
        assert_eq!(value.as_object().unwrap().len(), 3);
    }

    #[test]
    fn user_agent_names_the_version() {
        assert_eq!(
            USER_AGENT,
            format!(
                "capy-webhooks/{} (+https://capydb.io/webhooks)",
                env!("CARGO_PKG_VERSION")
            )
        );
    }

    #[tokio::test]
    async fn url_policy_refusals() {
        let strict_https = sender(false, TargetPolicy::default());
        assert!(
            refusal(&strict_https, "ftp://example.com/hook")
                .await
                .contains("\"ftp\"")
        );
        assert!(refusal(&strict_https, "http://example.com/hook").await.contains("http"));
        assert!(
            refusal(&strict_https, "not a url")
                .await
                .starts_with("url is not an absolute URL")
        );
        for url in [
            "https://user:hunter2@example.com/hook",
            "https://user@example.com/hook",
            "https://:hunter2@example.com/hook",
        ] {
            let reason = refusal(&strict_https, url).await;
            assert!(reason.contains("credentials"), "{reason}");
            assert!(!reason.contains("hunter2") && !reason.contains("user"), "{reason}");
        }
        // IP literals are checked before sending, in every spelling the URL parser accepts.
        for url in [
            "https://127.0.0.1/hook",
            "https://2130706433/hook",
            "https://0x7f.1/hook",
            "https://[::1]/hook",
            "https://[::ffff:169.254.169.254]/hook",
            "https://169.254.169.254/latest/meta-data",
            "https://10.1.2.3/hook",
        ] {
            let reason = refusal(&strict_https, url).await;
            assert!(reason.ends_with("is not an allowed webhook target"), "{url}: {reason}");
        }
        // Allowing private targets still refuses metadata; allowing http still refuses ftp.
        let lenient = sender(true, PRIVATE);
        assert!(refusal(&lenient, "http://169.254.169.254/").await.contains("metadata"));
        assert!(refusal(&lenient, "ftp://127.0.0.1/").await.contains("\"ftp\""));
        assert!(refusal(&lenient, "http://u:p@127.0.0.1/").await.contains("credentials"));
    }

    #[test]
    fn check_target_url_accepts_good_urls() {
        let url = check_target_url("https://hooks.example.com/a?b=c", false, TargetPolicy::default()).unwrap();
        assert_eq!(url.host_str(), Some("hooks.example.com"));
        assert!(check_target_url("https://8.8.8.8/x", false, TargetPolicy::default()).is_ok());
        assert!(check_target_url("http://127.0.0.1:8080/x", true, PRIVATE).is_ok());
    }

    #[tokio::test]
    async fn resolver_refuses_when_any_address_is_refused() {
        let strict = GuardedResolver {
            policy: TargetPolicy::default(),
        };
        let err = match strict.resolve("localhost".parse().unwrap()).await {
            Ok(addrs) => panic!("localhost resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(err) => err,
        };
        let refused = err.downcast_ref::<TargetRefused>().expect("a typed refusal");
        assert_eq!(refused.host, "localhost");
        assert!(refused.to_string().contains("loopback address"), "{refused}");

        let lenient = GuardedResolver { policy: PRIVATE };
        let addrs: Vec<SocketAddr> = lenient.resolve("localhost".parse().unwrap()).await.unwrap().collect();
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }

    #[test]
    fn excerpt_is_lossy_and_capped() {
        assert_eq!(excerpt_text(b"", 10), None);
        assert_eq!(excerpt_text(b"hello", 10).as_deref(), Some("hello"));
        // Four invalid bytes become four 3-byte replacement characters: cut back to the cap.
        let text = excerpt_text(&[0xff; 4], 4).unwrap();
        assert_eq!(text, "\u{fffd}");
        // A multi-byte character cut by the byte cap shows as one replacement character.
        assert_eq!(excerpt_text(&"é".as_bytes()[..1], 1), None);
    }
}
