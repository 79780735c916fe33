//! HTTP plumbing shared by the public REST API and the internal ingest port: JSON error bodies,
//! bounded JSON request bodies, request ids in logs, and serving with graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use warp::http::{HeaderMap, HeaderValue, StatusCode, header};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::telemetry::Metrics;

/// An error answered as `{"error": message}` with an `application/json` content type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Message for the caller; never contains secrets or tokens.
    pub message: String,
    /// Seconds for a `Retry-After` header (503s).
    pub retry_after: Option<u64>,
    /// The methods the route takes, for the `Allow` header of a 405 (RFC 9110 §15.5.6).
    pub allow: Option<String>,
}

/// The `Retry-After` of a 503 whose cause gives no better estimate: long enough not to hammer a
/// busy port, short enough that a passing hiccup costs the caller little.
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 2;

impl warp::reject::Reject for ApiError {}

/// The body of every error answer: `{"error": message}`.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
#[schemars(rename = "Error", deny_unknown_fields)]
pub struct ErrorBody {
    /// What went wrong, for a person to read.
    pub error: String,
}

impl ApiError {
    /// An error with the given status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
            allow: None,
        }
    }
    /// 400 Bad Request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    /// 404 Not Found.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    /// 500, with a generic message; the cause goes to the log, not to the caller.
    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
    /// 503 with `Retry-After`.
    pub fn unavailable(message: impl Into<String>, retry_after_secs: u64) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            retry_after: Some(retry_after_secs),
            allow: None,
        }
    }
    /// 405, with the methods the route does take.
    pub fn method_not_allowed(allow: String) -> Self {
        Self {
            allow: Some(allow),
            ..Self::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route")
        }
    }
    /// The body this error answers with.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.message.clone(),
        }
    }
    /// The same error with `prefix` before its message (what the caller was doing).
    pub fn prefixed(mut self, prefix: &str) -> Self {
        self.message.insert_str(0, prefix);
        self
    }
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        let mut response = warp::reply::with_status(warp::reply::json(&self.body()), self.status).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(allow) = self.allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
            response.headers_mut().insert(header::ALLOW, allow);
        }
        response
    }
}

/// Turns every rejection into a JSON error: never an HTML or empty body.
pub async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    let error = if let Some(e) = rejection.find::<ApiError>() {
        e.clone()
    } else if rejection.is_not_found() {
        ApiError::not_found("no such route")
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route")
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "request body is too large")
    } else if rejection.find::<warp::reject::UnsupportedMediaType>().is_some() {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content-type must be application/json",
        )
    } else if let Some(e) = rejection.find::<warp::reject::InvalidQuery>() {
        ApiError::bad_request(format!("invalid query string: {e}"))
    } else if let Some(e) = rejection.find::<warp::reject::InvalidHeader>() {
        ApiError::bad_request(e.to_string())
    } else if let Some(e) = rejection.find::<warp::reject::MissingHeader>() {
        ApiError::bad_request(e.to_string())
    } else {
        tracing::error!(?rejection, "unhandled rejection");
        ApiError::internal()
    };
    Ok(error.into_response())
}

/// Whether a `Content-Type` value is JSON (`application/json`, any parameters).
pub fn is_json_content_type(value: &str) -> bool {
    value
        .split(';')
        .next()
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// Whether a route's JSON body must be there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyRule {
    /// A JSON body with a JSON `Content-Type`.
    Required,
    /// As [`Self::Required`], or no body at all (and then no `Content-Type` either), read as an
    /// empty one.
    Optional,
}

/// Reads a JSON request body of at most `limit` bytes, unparsed: a handler calls it once it has
/// authenticated the caller, so that an anonymous client cannot make a port buffer bodies.
///
/// 415 for a missing or non-JSON content type, 413 beyond the limit (checked on the declared
/// length and again while reading, so a chunked body cannot grow past it).
pub async fn read_json_body<S, B>(headers: &HeaderMap, body: S, limit: usize, rule: BodyRule) -> Result<Bytes, ApiError>
where
    S: futures::Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let wrong_type = || {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content-type must be application/json",
        )
    };
    let content_type = match headers.get(header::CONTENT_TYPE) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::bad_request("invalid content-type header"))?,
        ),
    };
    if rule == BodyRule::Optional && content_type.is_none() {
        // Nothing but an empty body may come without a content-type.
        return read_limited(body, 0).await.map_err(|_| wrong_type());
    }
    if !content_type.is_some_and(is_json_content_type) {
        return Err(wrong_type());
    }
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {limit} bytes"),
        )
    };
    let length = match headers.get(header::CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| ApiError::bad_request("invalid content-length header"))?,
        ),
    };
    if length.is_some_and(|l| l > limit as u64) {
        return Err(too_large());
    }
    read_limited(body, limit).await.map_err(|e| match e {
        None => too_large(),
        Some(e) => ApiError::bad_request(format!("reading body: {e}")),
    })
}

/// Collects a body stream, failing with `None` as soon as it exceeds `limit` bytes.
async fn read_limited<S, B>(body: S, limit: usize) -> Result<Bytes, Option<warp::Error>>
where
    S: futures::Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    futures::pin_mut!(body);
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(Some)?;
        if buf.len() + chunk.remaining() > limit {
            return Err(None);
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            let n = part.len();
            buf.extend_from_slice(part);
            chunk.advance(n);
        }
    }
    Ok(buf.freeze())
}

/// The token of an `Authorization: Bearer <token>` header value: scheme case-insensitive, one
/// token, surrounding whitespace ignored. `None` for any other shape. The one parser of bearer
/// credentials, for the public API and the ingest port alike.
pub fn bearer_token(header: &str) -> Option<&str> {
    let mut parts = header.split_ascii_whitespace();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(scheme), Some(token), None) if scheme.eq_ignore_ascii_case("bearer") => Some(token),
        _ => None,
    }
}

/// Parses JSON, turning serde's error into a 400 that says what is wrong.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let described = |e: &serde_json::Error, field: &str| {
        let what = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => "request body is not valid JSON",
            _ => "invalid request body",
        };
        // Name the field whose value is wrong, when there is one: `rate_limit: invalid type ...`.
        match field {
            "." | "" => ApiError::bad_request(format!("{what}: {e}")),
            _ => ApiError::bad_request(format!("{what}: {field}: {e}")),
        }
    };
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|e| described(e.inner(), &e.path().to_string()))?;
    deserializer.end().map_err(|e| described(&e, ""))?;
    Ok(value)
}

/// The `route` label of requests no route serves.
pub const OTHER_ROUTE: &str = "other";

/// One route of a port: a path template, a method, and the operation that serves them.
///
/// A template is the path with its ids written as parameters (`:org`, `:id`, ...): it is the
/// `route` label of HTTP metrics, so labels stay few whatever clients send. A parameter matches
/// one non-empty segment, as it comes (not percent-decoded). A template that ends in `/` also
/// matches its path without the slash (the operation tells the two apart if it cares).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<Op: 'static> {
    /// The path, ids as `:name` parameters.
    pub template: &'static str,
    /// The HTTP method, upper case.
    pub method: &'static str,
    /// What serves it.
    pub operation: Op,
}

/// A request matched to its route: the route and its path parameters, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched<Op: 'static> {
    /// The route.
    pub route: &'static Route<Op>,
    params: Vec<(&'static str, String)>,
}

impl<Op> Matched<Op> {
    /// The value of the path parameter `:name`; empty if the template has none of that name.
    pub fn param(&self, name: &str) -> String {
        self.params
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }
}

/// Every route of a port, in one place: the route templates of metrics, the `Allow` header of a
/// 405 and the request dispatch all come from it.
#[derive(Debug)]
pub struct RouteTable<Op: 'static> {
    routes: &'static [Route<Op>],
}

impl<Op: Copy + PartialEq> RouteTable<Op> {
    /// A table of `routes`; the first route of a template comes first in `Allow`.
    pub const fn new(routes: &'static [Route<Op>]) -> Self {
        Self { routes }
    }

    /// The routes, in table order.
    pub fn routes(&self) -> &'static [Route<Op>] {
        self.routes
    }

    /// The parameters of `path` if it matches `template`; `None` otherwise.
    fn match_path(template: &'static str, path: &str) -> Option<Vec<(&'static str, String)>> {
        let path = path.strip_prefix('/').unwrap_or(path);
        let template = template.strip_prefix('/').unwrap_or(template);
        // `/portal` is `/portal/`: a directory template also matches its path without the slash.
        let path = match template.strip_suffix('/') {
            Some(dir) if path == dir => template,
            _ => path,
        };
        let mut params = Vec::new();
        let mut segments = path.split('/');
        for expected in template.split('/') {
            let segment = segments.next()?;
            match expected.strip_prefix(':') {
                Some(name) if !segment.is_empty() => params.push((name, segment.to_string())),
                Some(_) => return None,
                None if segment == expected => {}
                None => return None,
            }
        }
        segments.next().is_none().then_some(params)
    }

    /// The route template of `path` (the `route` label of metrics), or [`OTHER_ROUTE`].
    pub fn template_of(&self, path: &str) -> &'static str {
        self.routes
            .iter()
            .find(|r| Self::match_path(r.template, path).is_some())
            .map_or(OTHER_ROUTE, |r| r.template)
    }

    /// The methods `template` takes, as an `Allow` header value (`""` for an unknown template).
    pub fn allowed_methods(&self, template: &str) -> String {
        let mut methods: Vec<&str> = Vec::new();
        for route in self.routes.iter().filter(|r| r.template == template) {
            if !methods.contains(&route.method) {
                methods.push(route.method);
            }
        }
        methods.join(", ")
    }

    /// The route that serves `method` on `path`. The path is matched first: 404 for a path no
    /// route serves, 405 (with `Allow`) for a known path and another method.
    pub fn resolve(&self, method: &str, path: &str) -> Result<Matched<Op>, ApiError> {
        let mut known_path = None;
        for route in self.routes {
            let Some(params) = Self::match_path(route.template, path) else {
                continue;
            };
            if route.method == method {
                return Ok(Matched { route, params });
            }
            known_path.get_or_insert(route.template);
        }
        match known_path {
            Some(template) => Err(ApiError::method_not_allowed(self.allowed_methods(template))),
            None => Err(ApiError::not_found("no such route")),
        }
    }
}

/// Wraps routes so that every request gets a fresh request id (echoed in the `x-request-id`
/// response header), one log line with its status and latency, and its metrics
/// (`capy_webhooks_http_requests_total`, `capy_webhooks_http_request_duration_seconds`) under the
/// route template `route_of` gives its path.
pub fn with_request_log<F>(
    routes: F,
    component: &'static str,
    route_of: fn(&str) -> &'static str,
    metrics: Metrics,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone
where
    F: Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static,
{
    warp::any()
        .map(|| (new_request_id(), Instant::now()))
        .and(warp::method())
        .and(warp::path::full())
        .and(routes)
        .map(
            move |(id, started): (String, Instant),
                  method: warp::http::Method,
                  path: warp::path::FullPath,
                  mut response: Response| {
                let elapsed = started.elapsed();
                let status = response.status().as_u16();
                // Paths carry organization and endpoint ids, never credentials; queries are not logged.
                tracing::info!(component, request_id = %id, %method, path = path.as_str(), status, latency_ms = elapsed.as_millis() as u64, "request");
                metrics.http_request(component, route_of(path.as_str()), method.as_str(), status, elapsed);
                if let Ok(v) = HeaderValue::from_str(&id) {
                    response.headers_mut().insert("x-request-id", v);
                }
                response
            },
        )
}

/// The span of one request of `component`'s port, named by its route template (`http.route`,
/// never the path: paths carry ids). A W3C `traceparent` from the client makes it a child of the
/// client's span. Exported only when tracing is on ([`crate::traces`]).
pub fn request_span(component: &'static str, method: &str, route: &'static str, headers: &HeaderMap) -> tracing::Span {
    let span = tracing::info_span!(
        target: crate::traces::TARGET,
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        capy.component = component,
        http.request.method = method,
        http.route = route,
        http.response.status_code = tracing::field::Empty,
    );
    crate::traces::continue_from(
        &span,
        headers.get(crate::traces::TRACEPARENT).and_then(|v| v.to_str().ok()),
    );
    span
}

/// Serves a request inside its [`request_span`], and records the answer's status on it.
pub async fn traced(span: tracing::Span, serve: impl Future<Output = Response>) -> Response {
    use tracing::Instrument;
    let response = serve.instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}

fn new_request_id() -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("{n:016x}")
}

/// What a port tolerates from its clients, so that slow or idle connections cannot hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Time a client has to send a request's headers, from its first byte (or from the
    /// connection's start); then the connection is closed.
    pub header_read_timeout: Duration,
    /// A connection with no bytes read or written and no request in flight for this long is
    /// closed.
    pub idle_timeout: Duration,
    /// Connections served at once; beyond it new connections wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

/// Serves `routes` on an already bound listener until `shutdown` resolves; in-flight requests
/// finish first. HTTP/1.1 and HTTP/2 (prior knowledge), with `limits` on every connection.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    routes: F,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: ServerLimits,
) where
    F: Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static,
{
    let max = limits.max_connections.max(1);
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // A slot first: at the cap, connections wait in the kernel's backlog, not in memory.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: say so and give the system a moment.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(warp::service(routes.clone()));
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let activity = Arc::new(Activity::new());
            let io = ActivityIo {
                inner: hyper_util::rt::TokioIo::new(stream),
                activity: activity.clone(),
            };
            let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            builder.http2().timer(hyper_util::rt::TokioTimer::new());
            let conn = builder.serve_connection_with_upgrades(io, service);
            let mut conn = std::pin::pin!(conn);
            // Set when the connection was asked to close; if it is still silent one idle timeout
            // later (a client that stopped reading its answer), it is dropped.
            let mut closing: Option<Instant> = None;
            let mut tick = tokio::time::interval(
                limits
                    .idle_timeout
                    .min(Duration::from_secs(1))
                    .max(Duration::from_millis(50)),
            );
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = stop.wait_for(|stop| *stop), if closing.is_none() => {
                        closing = Some(Instant::now());
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = tick.tick() => {
                        let idle = activity.idle_for();
                        match closing {
                            None if idle >= limits.idle_timeout => {
                                // Lets a request in flight finish; an idle connection closes now.
                                closing = Some(Instant::now());
                                conn.as_mut().graceful_shutdown();
                            }
                            Some(since) if since.elapsed() >= limits.idle_timeout && idle >= limits.idle_timeout => {
                                tracing::debug!("dropping a connection that stayed silent after being asked to close");
                                break;
                            }
                            _ => {}
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a slot until it is done: all slots back means all finished.
    let _ = slots.acquire_many(max as u32).await;
}

/// When a connection last read or wrote a byte.
struct Activity {
    start: Instant,
    last_millis: std::sync::atomic::AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_millis: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_millis.store(now, std::sync::atomic::Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_millis.load(std::sync::atomic::Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// A connection's IO that records activity, for the idle timeout.
struct ActivityIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for ActivityIo<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if result.is_ready() {
            self.activity.touch();
        }
        result
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for ActivityIo<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if result.is_ready() {
            self.activity.touch();
        }
        result
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if result.is_ready() {
            self.activity.touch();
        }
        result
    }
}

/// A rate limit per key (an organization): `per_second` requests, with bursts of `burst`.
/// Each key has its own bucket; keys come only after authentication, so they are few.
pub struct KeyedRateLimit {
    per_second: f64,
    burst: f64,
    buckets: std::sync::Mutex<std::collections::HashMap<String, (f64, Instant)>>,
}

impl KeyedRateLimit {
    /// `per_second` requests per key (0: unlimited), bursts of `burst` (at least 1).
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self {
            per_second,
            burst: f64::from(burst.max(1)),
            buckets: Default::default(),
        }
    }

    /// Charges `key` for `n` more units of work a request it was admitted for turned out to do
    /// (a recovery that resends `n` deliveries): the bucket may go below zero, and the key's next
    /// requests wait until it has refilled. Nothing for an unlimited key.
    pub fn charge(&self, key: &str, n: usize, now: Instant) {
        if self.per_second <= 0.0 || n == 0 {
            return;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (level, updated) = buckets.entry(key.to_string()).or_insert((self.burst, now));
        let refilled =
            (*level + now.saturating_duration_since(*updated).as_secs_f64() * self.per_second).min(self.burst);
        *updated = (*updated).max(now);
        *level = refilled - n as f64;
    }

    /// Takes one request for `key` at `now`; when the key is over its rate, how long until the
    /// next request is admitted (whole seconds, at least 1, as `Retry-After` counts).
    pub fn take(&self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.per_second <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (level, updated) = buckets.entry(key.to_string()).or_insert((self.burst, now));
        let refilled =
            (*level + now.saturating_duration_since(*updated).as_secs_f64() * self.per_second).min(self.burst);
        *updated = (*updated).max(now);
        if refilled >= 1.0 {
            *level = refilled - 1.0;
            Ok(())
        } else {
            *level = refilled;
            let wait = ((1.0 - refilled) / self.per_second).ceil().max(1.0);
            Err(Duration::from_secs(wait as u64))
        }
    }
}

/// Binds a TCP listener, with an error that names the address.
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for the {what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        assert!(is_json_content_type("application/json"));
        assert!(is_json_content_type("Application/JSON; charset=utf-8"));
        assert!(!is_json_content_type("text/plain"));
        assert!(!is_json_content_type("application/jsonx"));
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        url: String,
    }

    #[test]
    fn parse_errors_name_the_problem() {
        let e = parse_json::<Body>(b"{").unwrap_err();
        assert!(e.message.starts_with("request body is not valid JSON"), "{}", e.message);
        let e = parse_json::<Body>(br#"{"url": "x", "colour": 1}"#).unwrap_err();
        assert!(e.message.contains("unknown field `colour`"), "{}", e.message);
        let e = parse_json::<Body>(br#"{"url": 5}"#).unwrap_err();
        assert!(
            e.message.contains("invalid type: integer `5`, expected a string"),
            "{}",
            e.message
        );
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn rejections_become_json_errors() {
        let routes = warp::path!("a").and(warp::get()).map(|| "ok").recover(recover);
        let res = warp::test::request().path("/nope").reply(&routes).await;
        assert_eq!(res.status(), 404);
        assert_eq!(res.headers()["content-type"], "application/json");
        let res = warp::test::request().method("DELETE").path("/a").reply(&routes).await;
        assert_eq!(res.status(), 405);
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (header::HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    fn body(text: &'static str) -> impl futures::Stream<Item = Result<Bytes, warp::Error>> {
        futures::stream::iter(text.as_bytes().chunks(4).map(|c| Ok(Bytes::from_static(c))))
    }

    #[tokio::test]
    async fn json_bodies_are_checked_for_type_and_size() {
        let json = headers(&[("content-type", "application/json")]);
        async fn read(h: &HeaderMap, text: &'static str, rule: BodyRule) -> Result<Bytes, ApiError> {
            read_json_body(h, body(text), 16, rule).await
        }
        assert_eq!(read(&json, "{}", BodyRule::Required).await.unwrap(), "{}");
        let status = |r: Result<Bytes, ApiError>| r.unwrap_err().status.as_u16();
        let plain = headers(&[("content-type", "text/plain")]);
        assert_eq!(status(read(&plain, "{}", BodyRule::Required).await), 415);
        assert_eq!(status(read(&HeaderMap::new(), "{}", BodyRule::Required).await), 415);
        // Chunked past the limit, and declared past it.
        let e = read(&json, r#"{"url": "a very long url value"}"#, BodyRule::Required)
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(e.message.contains("16 bytes"), "{}", e.message);
        let declared = headers(&[("content-type", "application/json"), ("content-length", "17")]);
        assert_eq!(status(read(&declared, "{}", BodyRule::Required).await), 413);
        // An optional body may be absent, and then has no content-type.
        assert_eq!(read(&HeaderMap::new(), "", BodyRule::Optional).await.unwrap(), "");
        assert_eq!(status(read(&HeaderMap::new(), "{}", BodyRule::Optional).await), 415);
        assert_eq!(read(&json, "{}", BodyRule::Optional).await.unwrap(), "{}");
    }

    #[test]
    fn route_tables_match_paths_first_then_methods() {
        static TABLE: RouteTable<u8> = RouteTable::new(&[
            Route {
                template: "/a/:x",
                method: "GET",
                operation: 1,
            },
            Route {
                template: "/a/:x",
                method: "POST",
                operation: 2,
            },
            Route {
                template: "/d/",
                method: "GET",
                operation: 3,
            },
        ]);
        let matched = TABLE.resolve("POST", "/a/b%20c").unwrap();
        assert_eq!((matched.route.operation, matched.param("x")), (2, "b%20c".to_string()));
        assert_eq!(matched.param("y"), "");
        let e = TABLE.resolve("DELETE", "/a/b").unwrap_err();
        assert_eq!((e.status.as_u16(), e.allow.as_deref()), (405, Some("GET, POST")));
        let e = TABLE.resolve("GET", "/a/").unwrap_err();
        assert_eq!((e.status.as_u16(), e.allow), (404, None));
        assert_eq!(TABLE.resolve("GET", "/d").unwrap().route.operation, 3);
        assert_eq!(TABLE.template_of("/d"), "/d/");
        assert_eq!(TABLE.template_of("/a/b/c"), OTHER_ROUTE);
        assert_eq!(TABLE.template_of("/a"), OTHER_ROUTE);
        let answer = ApiError::method_not_allowed("GET".into()).into_response();
        assert_eq!(answer.headers()[header::ALLOW], "GET");
    }

    #[test]
    fn bearer_tokens_are_parsed_one_way() {
        for (header, want) in [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("BEARER   abc  ", Some("abc")),
            ("Bearer", None),
            ("Bearer a b", None),
            ("Basic abc", None),
            ("abc", None),
            ("", None),
        ] {
            assert_eq!(bearer_token(header), want, "{header:?}");
        }
    }

    #[test]
    fn keyed_rate_limit_admits_bursts_then_spaces_requests() {
        let limit = KeyedRateLimit::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limit.take("org_a", t0), Ok(()));
        }
        assert_eq!(limit.take("org_a", t0), Err(Duration::from_secs(1)));
        // Another key has its own bucket.
        assert_eq!(limit.take("org_b", t0), Ok(()));
        // Half a second later one request's worth is back (2 per second).
        assert_eq!(limit.take("org_a", t0 + Duration::from_millis(500)), Ok(()));
        assert!(limit.take("org_a", t0 + Duration::from_millis(500)).is_err());
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(limit.take("org_a", later), Ok(()));
        }
        assert!(limit.take("org_a", later).is_err());
        let slow = KeyedRateLimit::new(0.1, 1);
        assert_eq!(slow.take("k", t0), Ok(()));
        assert_eq!(slow.take("k", t0), Err(Duration::from_secs(10)));
        let unlimited = KeyedRateLimit::new(0.0, 1);
        assert!((0..1000).all(|_| unlimited.take("k", t0).is_ok()));
    }

    #[test]
    fn a_charge_puts_a_key_in_debt_until_it_refills() {
        let limit = KeyedRateLimit::new(2.0, 3);
        let t0 = Instant::now();
        assert_eq!(limit.take("org_a", t0), Ok(()));
        // The request turned out to do ten more units: 2 - 10 = -8, four seconds to refill to 0.
        limit.charge("org_a", 10, t0);
        assert_eq!(limit.take("org_a", t0), Err(Duration::from_secs(5)));
        assert!(limit.take("org_a", t0 + Duration::from_secs(4)).is_err());
        assert_eq!(limit.take("org_a", t0 + Duration::from_millis(4500)), Ok(()));
        assert_eq!(limit.take("org_b", t0), Ok(()), "another key is not charged");
        let unlimited = KeyedRateLimit::new(0.0, 1);
        unlimited.charge("k", 1_000_000, t0);
        assert_eq!(unlimited.take("k", t0), Ok(()));
    }
}
