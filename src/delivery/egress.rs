//! Deliveries through an HTTP CONNECT egress proxy (`--egress-proxy`).
//!
//! Receivers' firewalls often allow only a known source address; an operator gets one by sending
//! every delivery through a proxy with a static address. The SSRF guard still decides where a
//! delivery goes: the dispatcher resolves the receiver's host itself, checks every address
//! ([`ssrf::check_all`]) and asks the proxy to `CONNECT` to the checked *IP address* and port,
//! never to the host name. The proxy therefore never resolves a tenant's name and can reach only
//! what the guard allowed. TLS to the receiver runs inside the tunnel, with SNI and certificate
//! verification for the original host name; the `Host` header stays the original host.
//!
//! reqwest's own proxy support sends the host name in `CONNECT` (and forwards plain `http://`
//! requests instead of tunnelling them), so the tunnelled client is hyper-util's pooled client
//! over [`TunnelConnector`]: keep-alive connections per receiver host, as reqwest's (which is
//! built on it). Every plain part (reading the proxy URL, the `CONNECT` request, the proxy's
//! answer) is a function without IO below, unit-tested.
//!
//! The proxy's credentials (userinfo of the URL) go only into `Proxy-Authorization: Basic` of the
//! `CONNECT` request: [`EgressProxy`]'s `Debug` redacts them, and no error names them, nor the
//! proxy's address (errors reach the endpoint's status, which tenants read).

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::client_certificate::ClientIdentity;
use crate::delivery::sender::resolve_checked;
use crate::delivery::ssrf::{self, TargetPolicy};

/// Longest answer to `CONNECT` read from a proxy (status line and headers).
const MAX_ANSWER_BYTES: usize = 8 * 1024;

/// The egress proxy deliveries go through: where it listens and the `Proxy-Authorization` value
/// made from the URL's credentials. `Debug` never shows the credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct EgressProxy {
    host: String,
    port: u16,
    authorization: Option<String>,
}

impl fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressProxy")
            .field("address", &self.address())
            .field(
                "credentials",
                &if self.authorization.is_some() {
                    "<redacted>"
                } else {
                    "none"
                },
            )
            .finish()
    }
}

impl EgressProxy {
    /// Reads `http://[user:password@]host[:port]` (port 80 when left out). Errors say what is
    /// wrong without repeating the URL, which may hold a password.
    pub fn parse(url: &str) -> Result<Self, String> {
        let parsed = url::Url::parse(url.trim())
            .map_err(|err| format!("the egress proxy URL is not an absolute URL ({err})"))?;
        if parsed.scheme() != "http" {
            // Not naming the scheme: in `user:password@host` the parser takes `user` for one.
            return Err("the egress proxy URL must start with http:// (a proxy reached with HTTP CONNECT)".into());
        }
        let host = match parsed.host() {
            Some(url::Host::Domain(name)) => name.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err("the egress proxy URL has no host".into()),
        };
        if !matches!(parsed.path(), "" | "/") || parsed.query().is_some() || parsed.fragment().is_some() {
            return Err("the egress proxy URL must be only scheme, credentials, host and port".into());
        }
        let port = parsed.port_or_known_default().unwrap_or(80);
        let authorization = if parsed.username().is_empty() && parsed.password().is_none() {
            None
        } else {
            let user = percent_decoded(parsed.username())?;
            let password = percent_decoded(parsed.password().unwrap_or_default())?;
            Some(basic_authorization(&user, &password))
        };
        Ok(Self {
            host,
            port,
            authorization,
        })
    }

    /// `host:port` of the proxy, without credentials (for logs; never in delivery errors).
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Whether the URL carried credentials.
    pub fn has_credentials(&self) -> bool {
        self.authorization.is_some()
    }
}

fn percent_decoded(text: &str) -> Result<String, String> {
    url::form_urlencoded::parse(format!("x={}", text.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, value)| value.into_owned())
        .ok_or_else(|| "the egress proxy URL's credentials are not valid".to_string())
}

/// `Basic base64(user:password)`, the `Proxy-Authorization` value.
fn basic_authorization(user: &str, password: &str) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {token}")
}

/// The `CONNECT` request for a checked address: the authority is the IP address and port, so the
/// proxy has no name to resolve.
pub fn connect_request(target: SocketAddr, authorization: Option<&str>) -> Vec<u8> {
    // SocketAddr's Display is the authority form: `192.0.2.1:443`, `[2001:db8::1]:443`.
    let mut request = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: {}\r\n",
        crate::delivery::sender::USER_AGENT
    );
    if let Some(value) = authorization {
        request.push_str("Proxy-Authorization: ");
        request.push_str(value);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// Why a tunnel through the proxy could not be opened. The texts name neither the proxy's address
/// nor its credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// No TCP connection to the proxy (refused, unreachable, its name did not resolve).
    Unreachable(String),
    /// The proxy answered `CONNECT` with this non-2xx status.
    Refused(u16),
    /// The proxy closed the connection before its answer was complete.
    Closed,
    /// The proxy's answer is not HTTP, is too long, or data followed it before the tunnel was used.
    Malformed(&'static str),
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::Unreachable(cause) => write!(f, "the egress proxy could not be reached: {cause}"),
            ProxyError::Refused(status @ (401 | 407)) => write!(
                f,
                "the egress proxy refused CONNECT with HTTP {status} (check the proxy's credentials)"
            ),
            ProxyError::Refused(status) => write!(f, "the egress proxy refused CONNECT with HTTP {status}"),
            ProxyError::Closed => f.write_str("the egress proxy closed the connection before answering CONNECT"),
            ProxyError::Malformed(what) => write!(f, "the egress proxy's answer to CONNECT {what}"),
        }
    }
}

impl StdError for ProxyError {}

/// What the bytes read so far from the proxy say about the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectAnswer {
    /// The answer's header has not ended yet: read more.
    Incomplete,
    /// A 2xx status: the tunnel is open after `header_len` bytes.
    Established { header_len: usize },
}

/// Reads the proxy's answer to `CONNECT` from the bytes received so far.
pub fn parse_connect_answer(buf: &[u8]) -> Result<ConnectAnswer, ProxyError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() >= MAX_ANSWER_BYTES {
            return Err(ProxyError::Malformed("is too long"));
        }
        // A status line that is already wrong need not wait for the rest.
        let probe = &buf[..buf.len().min(9)];
        if !b"HTTP/1.".starts_with(&probe[..probe.len().min(7)]) {
            return Err(ProxyError::Malformed("is not HTTP"));
        }
        return Ok(ConnectAnswer::Incomplete);
    };
    let status_line = buf[..end].split(|b| *b == b'\n').next().unwrap_or_default();
    let status_line = std::str::from_utf8(status_line).map_err(|_| ProxyError::Malformed("is not HTTP"))?;
    let mut parts = status_line.trim_end_matches('\r').splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") || code.len() != 3 {
        return Err(ProxyError::Malformed("is not HTTP"));
    }
    let status: u16 = code.parse().map_err(|_| ProxyError::Malformed("is not HTTP"))?;
    if !(200..300).contains(&status) {
        return Err(ProxyError::Refused(status));
    }
    Ok(ConnectAnswer::Established { header_len: end + 4 })
}

/// Opening the tunnel (resolving, reaching the proxy, its answer, TLS) took longer than the
/// connect timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectTimedOut;

impl fmt::Display for ConnectTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connecting through the egress proxy timed out")
    }
}

impl StdError for ConnectTimedOut {}

type BoxError = Box<dyn StdError + Send + Sync>;

/// A connection to a receiver through the proxy's tunnel: plain for `http://`, TLS for `https://`.
#[allow(clippy::large_enum_variant)]
pub enum Tunnel {
    Plain(TcpStream),
    Tls(TlsStream<TcpStream>),
}

impl Connection for Tunnel {
    fn connected(&self) -> Connected {
        // Not `proxy(true)`: the tunnel reaches the receiver itself, so requests are origin-form.
        Connected::new()
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Tunnel::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Tunnel::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Tunnel::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Tunnel::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Tunnel::Plain(s) => Pin::new(s).poll_flush(cx),
            Tunnel::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Tunnel::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Tunnel::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// hyper-util's connector for the tunnelled client: resolves and checks the receiver's host,
/// asks the proxy to `CONNECT` to a checked address, then runs TLS for the original host name.
#[derive(Clone)]
pub struct TunnelConnector {
    proxy: Arc<EgressProxy>,
    policy: TargetPolicy,
    tls: tokio_rustls::TlsConnector,
    connect_timeout: Duration,
}

impl TunnelConnector {
    pub fn new(
        proxy: EgressProxy,
        policy: TargetPolicy,
        tls: Arc<rustls::ClientConfig>,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            proxy: Arc::new(proxy),
            policy,
            tls: tokio_rustls::TlsConnector::from(tls),
            connect_timeout,
        }
    }

    async fn connect(self, uri: http::Uri) -> Result<TokioIo<Tunnel>, BoxError> {
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let host = uri
            .host()
            .ok_or("the webhook URL has no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let work = async {
            let targets = match host.parse::<IpAddr>() {
                Ok(ip) => {
                    ssrf::check_address(ip, self.policy).map_err(|reason| -> BoxError { reason.into() })?;
                    vec![SocketAddr::new(ip, port)]
                }
                Err(_) => resolve_checked(&host, port, self.policy).await?,
            };
            let mut last: Option<ProxyError> = None;
            for target in targets {
                match open_tunnel(&self.proxy, target).await {
                    Ok(tcp) => return self.finish(tcp, https, &host).await,
                    Err(err) => last = Some(err),
                }
            }
            Err(Box::new(last.unwrap_or(ProxyError::Closed)) as BoxError)
        };
        match tokio::time::timeout(self.connect_timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(Box::new(ConnectTimedOut)),
        }
    }

    /// TLS for the original host name inside the tunnel, for `https://`.
    async fn finish(&self, tcp: TcpStream, https: bool, host: &str) -> Result<TokioIo<Tunnel>, BoxError> {
        if !https {
            return Ok(TokioIo::new(Tunnel::Plain(tcp)));
        }
        let name =
            ServerName::try_from(host.to_string()).map_err(|_| "the webhook URL's host is not a valid TLS name")?;
        let tls = self.tls.connect(name, tcp).await?;
        Ok(TokioIo::new(Tunnel::Tls(tls)))
    }
}

impl tower_service::Service<http::Uri> for TunnelConnector {
    type Response = TokioIo<Tunnel>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

/// A TCP connection to the proxy, `CONNECT` to `target`, and the proxy's 2xx answer.
async fn open_tunnel(proxy: &EgressProxy, target: SocketAddr) -> Result<TcpStream, ProxyError> {
    let unreachable = |err: io::Error| ProxyError::Unreachable(err.to_string());
    let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(unreachable)?;
    tcp.set_nodelay(true).map_err(unreachable)?;
    tcp.write_all(&connect_request(target, proxy.authorization.as_deref()))
        .await
        .map_err(unreachable)?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = tcp.read(&mut chunk).await.map_err(unreachable)?;
        if n == 0 {
            return Err(ProxyError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let ConnectAnswer::Established { header_len } = parse_connect_answer(&buf)? {
            // The receiver speaks only after the client (TLS ClientHello, HTTP request): bytes
            // after the answer would be the proxy's, and would corrupt the stream.
            if header_len != buf.len() {
                return Err(ProxyError::Malformed("is followed by unexpected data"));
            }
            return Ok(tcp);
        }
    }
}

/// The TLS configuration of tunnelled deliveries, the same trust as the direct client's: the
/// platform's verifier with `extra_roots_pem` added, the one crypto provider, HTTP/1.1, and
/// `identity`'s client certificate when given (mutual TLS).
pub fn tls_config(extra_roots_pem: &[u8], identity: Option<&ClientIdentity>) -> Result<rustls::ClientConfig, String> {
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let verifier = if extra_roots_pem.is_empty() {
        rustls_platform_verifier::Verifier::new(provider.clone())
    } else {
        let roots = CertificateDer::pem_slice_iter(extra_roots_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| "the receiver CA file is not valid PEM".to_string())?;
        rustls_platform_verifier::Verifier::new_with_extra_roots(roots, provider.clone())
    }
    .map_err(|err| format!("the TLS verifier could not be built: {err}"))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS versions: {err}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(identity) => {
            let chain = CertificateDer::pem_slice_iter(identity.pem())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| "the client certificate is not valid PEM".to_string())?;
            let key = PrivateKeyDer::from_pem_slice(identity.pem())
                .map_err(|_| "the client certificate's key is not valid PEM".to_string())?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|_| "the client certificate could not be used".to_string())?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proxy_urls() {
        let plain = EgressProxy::parse("http://proxy.internal:3128").unwrap();
        assert_eq!(plain.address(), "proxy.internal:3128");
        assert!(!plain.has_credentials());
        assert_eq!(EgressProxy::parse("http://10.0.0.7/").unwrap().address(), "10.0.0.7:80");
        assert_eq!(
            EgressProxy::parse("http://[fd00::7]:8888").unwrap().address(),
            "[fd00::7]:8888"
        );

        let with = EgressProxy::parse("http://capy:s3cr%40t@proxy:3128").unwrap();
        assert!(with.has_credentials());
        // base64("capy:s3cr@t")
        assert_eq!(with.authorization.as_deref(), Some("Basic Y2FweTpzM2NyQHQ="));
        let user_only = EgressProxy::parse("http://capy@proxy:3128").unwrap();
        assert_eq!(user_only.authorization.as_deref(), Some("Basic Y2FweTo="));
    }

    #[test]
    fn proxy_url_errors_never_repeat_the_url() {
        for url in [
            "https://user:hunter2@proxy:3128",
            "socks5://user:hunter2@proxy:1080",
            "http://user:hunter2@proxy:3128/path",
            "http://user:hunter2@proxy:3128/?q=1",
            "user:hunter2@proxy:3128",
            "http://user:hunter2@:3128",
        ] {
            let err = EgressProxy::parse(url).unwrap_err();
            assert!(!err.contains("hunter2") && !err.contains("user"), "{url}: {err}");
        }
    }

    #[test]
    fn debug_redacts_credentials() {
        let proxy = EgressProxy::parse("http://capy:hunter2@proxy:3128").unwrap();
        let shown = format!("{proxy:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("capy:") && !shown.contains("Basic"),
            "{shown}"
        );
        assert!(shown.contains("proxy:3128") && shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn connect_names_the_checked_address() {
        let v4 = String::from_utf8(connect_request("203.0.113.9:8443".parse().unwrap(), None)).unwrap();
        assert!(
            v4.starts_with("CONNECT 203.0.113.9:8443 HTTP/1.1\r\nHost: 203.0.113.9:8443\r\n"),
            "{v4}"
        );
        assert!(v4.ends_with("\r\n\r\n") && !v4.contains("Proxy-Authorization"), "{v4}");
        let v6 = String::from_utf8(connect_request(
            "[2001:db8::1]:443".parse().unwrap(),
            Some("Basic eDp5"),
        ))
        .unwrap();
        assert!(v6.starts_with("CONNECT [2001:db8::1]:443 HTTP/1.1\r\n"), "{v6}");
        assert!(v6.contains("\r\nProxy-Authorization: Basic eDp5\r\n"), "{v6}");
        assert_eq!(v6.matches("\r\n\r\n").count(), 1);
    }

    #[test]
    fn reads_the_proxys_answer() {
        let ok = b"HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n";
        assert_eq!(
            parse_connect_answer(ok),
            Ok(ConnectAnswer::Established { header_len: ok.len() })
        );
        assert_eq!(
            parse_connect_answer(b"HTTP/1.1 200 OK\r\n\r\n"),
            Ok(ConnectAnswer::Established { header_len: 19 })
        );
        assert_eq!(parse_connect_answer(b"HTTP/1.1 20"), Ok(ConnectAnswer::Incomplete));
        assert_eq!(parse_connect_answer(b"HT"), Ok(ConnectAnswer::Incomplete));
        assert_eq!(parse_connect_answer(b""), Ok(ConnectAnswer::Incomplete));
        assert_eq!(
            parse_connect_answer(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n"),
            Err(ProxyError::Refused(407))
        );
        assert_eq!(
            parse_connect_answer(b"HTTP/1.0 403 Access violation\r\n\r\n"),
            Err(ProxyError::Refused(403))
        );
        assert_eq!(
            parse_connect_answer(b"SSH-2.0-OpenSSH\r\n"),
            Err(ProxyError::Malformed("is not HTTP"))
        );
        assert_eq!(
            parse_connect_answer(b"HTTP/1.1 2000 x\r\n\r\n"),
            Err(ProxyError::Malformed("is not HTTP"))
        );
        assert_eq!(
            parse_connect_answer(b"HTTP/2 200\r\n\r\n"),
            Err(ProxyError::Malformed("is not HTTP"))
        );
        let endless = [b"HTTP/1.1 200 OK\r\nX: ".as_slice(), &[b'a'; MAX_ANSWER_BYTES]].concat();
        assert_eq!(
            parse_connect_answer(&endless),
            Err(ProxyError::Malformed("is too long"))
        );
    }

    #[test]
    fn errors_name_the_status_and_nothing_of_the_proxy() {
        assert_eq!(
            ProxyError::Refused(403).to_string(),
            "the egress proxy refused CONNECT with HTTP 403"
        );
        assert!(
            ProxyError::Refused(407)
                .to_string()
                .ends_with("407 (check the proxy's credentials)")
        );
        assert!(
            ProxyError::Refused(401)
                .to_string()
                .ends_with("401 (check the proxy's credentials)")
        );
        assert!(
            ProxyError::Unreachable("Connection refused (os error 111)".into())
                .to_string()
                .starts_with("the egress proxy could not be reached: ")
        );
    }
}
