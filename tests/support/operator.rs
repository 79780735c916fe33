//! The operator's components running inside a test process, scoped to one namespace, plus an
//! HTTP client for its REST and ingest ports.

use std::sync::Arc;
use std::time::Duration;

use capy_webhooks::api::{self, ApiConfig};
use capy_webhooks::auth::Authenticator;
use capy_webhooks::auth::api_keys::ApiKeyIndex;
use capy_webhooks::auth::clerk::{ClerkConfig, ClerkVerifier, JwksSource};
use capy_webhooks::catalog::CatalogWatch;
use capy_webhooks::controller::{self, ControllerConfig};
use capy_webhooks::delivery::sender::SenderConfig;
use capy_webhooks::delivery::ssrf::TargetPolicy;
use capy_webhooks::delivery_log::{LogConfig, WriteBudget};
use capy_webhooks::dispatcher::{Dispatcher, DispatcherConfig};
use capy_webhooks::endpoints::EndpointCache;
use capy_webhooks::ingest::{self, IngestConfig};
use capy_webhooks::resources::Scope;
use capy_webhooks::telemetry::{Metrics, ReadyHandle};
use capy_webhooks::tenancy::NamespaceBinding;
use capy_webhooks::validation::UrlPolicy;
use capy_webhooks::work::WorkHandle;
use kube::Client;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::watch;

/// Issuer of the test Clerk instance.
pub const ISSUER: &str = "https://clerk.test.capydb.local";
/// The ingest token of test operators.
pub const INGEST_TOKEN: &str = "test-ingest-token-0123456789";

/// Serves a JWKS document on loopback, as a Clerk instance would; returns its URL.
pub async fn serve_jwks(jwks: String) -> String {
    use warp::Filter;
    let route = warp::path!(".well-known" / "jwks.json")
        .map(move || warp::reply::with_header(jwks.clone(), "content-type", "application/json"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(route).incoming(listener).run());
    format!("http://{addr}/.well-known/jwks.json")
}

/// A client, a fresh namespace (with the CRD installed) and an operator serving it.
pub async fn in_new_namespace(prefix: &str, opts: Options) -> (Client, String, Operator) {
    let client = super::client().await;
    super::install_crd(&client).await;
    let ns = super::test_namespace(&client, prefix).await;
    let op = Operator::start(&client, &ns, opts).await;
    (client, ns, op)
}

/// Which components to run and how.
pub struct Options {
    pub controller: bool,
    pub dispatcher: bool,
    pub controller_wait: Duration,
    pub schedule: &'static str,
    pub jwks_url: Option<String>,
    pub auto_disable_after: Duration,
    /// `--payload-retention` (`None`: payloads kept while their deliveries are).
    pub payload_retention: Option<Duration>,
    pub summary_interval: Duration,
    pub persist_timeout: Duration,
    pub attempt_timeout: Duration,
    pub rotation_grace: Duration,
    /// `--log-write-budget` in bytes per second (0: unlimited).
    pub log_write_budget: u64,
    /// `--home-namespace` when it differs from the served namespace (API keys live there, and
    /// other namespaces serve only the organization of their label).
    pub home_namespace: Option<String>,
    /// Timeouts and connection cap of the REST and ingest ports.
    pub server_limits: capy_webhooks::http::ServerLimits,
    /// `--max-endpoints-per-organization`.
    pub max_endpoints_per_organization: usize,
    /// `--organization-rate-limit` (0: unlimited).
    pub organization_rate_limit: f64,
    /// `--clerk-required-role`.
    pub clerk_required_roles: Vec<String>,
    /// `--allow-private-targets` (tests deliver to loopback, so on by default).
    pub allow_private_targets: bool,
    /// `--portal-session-ttl`.
    pub portal_session_ttl: jiff::SignedDuration,
    /// The delivery log's bounds.
    pub log: LogConfig,
    /// `--receiver-ca-file`'s contents: CAs (PEM) trusted for receivers.
    pub receiver_roots_pem: Vec<u8>,
    /// `--operational-webhook-url` and its secret.
    pub operational: Option<capy_webhooks::operational::OperationalTarget>,
    /// `--egress-proxy`.
    pub egress_proxy: Option<capy_webhooks::delivery::egress::EgressProxy>,
    /// `--strict-event-types`.
    pub strict_event_types: bool,
}

impl Options {
    /// The defaults with the dispatcher running.
    #[allow(dead_code)] // not every test binary dispatches
    pub fn dispatching() -> Self {
        Self {
            dispatcher: true,
            ..Self::default()
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            log: LogConfig::default(),
            controller: true,
            dispatcher: false,
            controller_wait: Duration::from_secs(20),
            schedule: "0s,200ms,200ms",
            jwks_url: None,
            auto_disable_after: Duration::from_secs(24 * 3600),
            payload_retention: None,
            summary_interval: Duration::from_millis(200),
            persist_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(5),
            rotation_grace: Duration::from_secs(3600),
            log_write_budget: 0,
            home_namespace: None,
            server_limits: capy_webhooks::http::ServerLimits::default(),
            max_endpoints_per_organization: 100,
            organization_rate_limit: 0.0,
            clerk_required_roles: Vec::new(),
            allow_private_targets: true,
            portal_session_ttl: capy_webhooks::auth::portal_token::DEFAULT_TTL,
            receiver_roots_pem: Vec::new(),
            operational: None,
            egress_proxy: None,
            strict_event_types: false,
        }
    }
}

/// A running operator; stops (gracefully) when dropped or `stop`ped.
pub struct Operator {
    pub base: String,
    pub ingest_base: String,
    pub http: reqwest::Client,
    /// The metrics every component of this operator counts into.
    pub metrics: Metrics,
    stop: watch::Sender<bool>,
    dispatcher: Option<Dispatcher>,
}

impl Operator {
    pub async fn start(client: &Client, ns: &str, opts: Options) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let stopped = {
            let stop_rx = stop_rx.clone();
            move || {
                let mut rx = stop_rx.clone();
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                }
            }
        };
        let scope = Scope::Namespace(ns.into());
        let home = opts.home_namespace.clone().unwrap_or_else(|| ns.to_string());
        let metrics = Metrics::new();
        let url_policy = UrlPolicy { allow_http: true };
        // The catalog of the home namespace, as the binary watches it.
        let catalog = CatalogWatch::start(client.clone(), &home);
        let cache = EndpointCache::start(
            client.clone(),
            &scope,
            NamespaceBinding::start(client.clone(), &scope, &home),
            opts.controller,
        );
        if let Some(feed) = cache.controller_feed() {
            let config = ControllerConfig {
                scope: scope.clone(),
                rotation_grace_period: opts.rotation_grace,
                url_policy,
                metrics: metrics.clone(),
                ready: ReadyHandle::detached(),
                operational: None,
            };
            tokio::spawn(controller::run(
                client.clone(),
                config,
                feed,
                watch::channel(true).1,
                stopped(),
            ));
        }
        let mut ingest_base = String::new();
        let dispatcher = if opts.dispatcher {
            let config = DispatcherConfig {
                home_namespace: home.clone(),
                scope: scope.clone(),
                schedule: opts.schedule.parse().expect("test schedule parses"),
                log: opts.log.clone(),
                sender: SenderConfig {
                    total_timeout: opts.attempt_timeout,
                    policy: TargetPolicy {
                        allow_private: opts.allow_private_targets,
                        allow_metadata: false,
                    },
                    allow_http: true,
                    extra_roots_pem: opts.receiver_roots_pem.clone(),
                    egress_proxy: opts.egress_proxy.clone(),
                    ..SenderConfig::default()
                },
                per_endpoint_concurrency: 8,
                summary_interval: opts.summary_interval,
                auto_disable_after: opts.auto_disable_after,
                payload_retention: opts.payload_retention,
                budget: WriteBudget::new(opts.log_write_budget),
                persist_timeout: opts.persist_timeout,
                shutdown_grace: Duration::from_secs(5),
                metrics: metrics.clone(),
                ready: ReadyHandle::detached(),
                operational: opts.operational.clone(),
                emitter: Default::default(),
            };
            let dispatcher = Dispatcher::start(
                client.clone(),
                cache.clone(),
                config,
                capy_webhooks::shards::ShardFeed::all_here(),
                stop_rx.clone(),
            )
            .await
            .expect("dispatcher starts");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            ingest_base = format!("http://{}", listener.local_addr().unwrap());
            let config = IngestConfig {
                server_limits: opts.server_limits,
                token: INGEST_TOKEN.into(),
                payload_limit: 64 * 1024,
                idempotency_window: Duration::from_secs(3600),
                idempotency_capacity: 1000,
                metrics: metrics.clone(),
                replicas: None,
                catalog: catalog.clone(),
                strict_event_types: opts.strict_event_types,
            };
            tokio::spawn(ingest::run(
                WorkHandle::new(dispatcher.clone()),
                config,
                listener,
                stopped(),
            ));
            Some(dispatcher)
        } else {
            None
        };
        let index = ApiKeyIndex::new();
        tokio::spawn(index.clone().run(client.clone(), home.clone()));
        index.wait_ready().await;
        let clerk = match &opts.jwks_url {
            Some(url) => Some(Arc::new(
                ClerkVerifier::new(
                    ClerkConfig {
                        required_roles: opts.clerk_required_roles.clone(),
                        ..ClerkConfig::new(JwksSource::Url(url.clone()), ISSUER)
                    },
                    reqwest::Client::new(),
                )
                .await
                .expect("JWKS loads"),
            )),
            None => None,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ApiConfig {
            server_limits: opts.server_limits,
            max_endpoints_per_organization: opts.max_endpoints_per_organization,
            organization_rate_limit: opts.organization_rate_limit,
            scope,
            home_namespace: home.clone(),
            url_policy,
            body_limit: 16 * 1024,
            controller_wait: opts.controller_wait,
            metrics: metrics.clone(),
            ready: ReadyHandle::detached(),
            portal_session_ttl: opts.portal_session_ttl,
            portal_url: None,
            catalog,
        };
        tokio::spawn(api::run(
            client.clone(),
            config,
            Authenticator::new(index, clerk),
            cache,
            dispatcher.clone().map(WorkHandle::new),
            listener,
            stopped(),
        ));
        let http = reqwest::Client::new();
        super::wait_for("REST API up", Duration::from_secs(30), || async {
            http.get(format!("http://{addr}/openapi.json"))
                .send()
                .await
                .ok()
                .filter(|r| r.status() == 200)
        })
        .await;
        Self {
            base: format!("http://{addr}/v1/organizations"),
            ingest_base,
            http,
            metrics,
            stop,
            dispatcher,
        }
    }

    /// The work handle of the dispatcher, when it runs.
    #[allow(dead_code)] // not every test binary asks for work directly
    pub fn work(&self) -> Option<WorkHandle> {
        self.dispatcher.clone().map(WorkHandle::new)
    }

    /// Stops every component and waits for the dispatcher to drain.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Some(d) = &self.dispatcher {
            d.wait_stopped().await;
        }
    }

    pub fn url(&self, org: &str, rest: &str) -> String {
        format!("{}/{org}/webhook-endpoints{rest}", self.base)
    }

    pub async fn call(
        &self,
        method: &str,
        url: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let mut req = self.http.request(method.parse().unwrap(), url);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let text = res.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON body for {method} {url}: {text:?}"));
        (status, body, headers)
    }

    /// Mints an API key and waits until the operator's key index knows it (the index follows
    /// the Secrets through a watch, so a brand-new key works a moment after it is made).
    pub async fn mint_key(
        &self,
        client: &Client,
        ns: &str,
        org: &str,
        project: Option<&str>,
    ) -> (capy_webhooks::auth::api_keys::ApiKeyRecord, String) {
        let (record, key) = capy_webhooks::auth::api_keys::create_key(client, ns, org, project, None)
            .await
            .expect("API key created");
        super::wait_for("new API key known to the operator", Duration::from_secs(10), || async {
            let (status, _, _) = self.call("GET", &self.url(org, ""), Some(&key), None).await;
            (status != StatusCode::UNAUTHORIZED).then_some(())
        })
        .await;
        (record, key)
    }

    /// Creates an endpoint of `org` at `url` through REST; returns its id (the create must
    /// answer 201).
    #[allow(dead_code)] // not every test binary creates endpoints this way
    pub async fn create_endpoint(&self, org: &str, key: &str, url: &str) -> String {
        let (status, created, _) = self
            .call(
                "POST",
                &self.url(org, ""),
                Some(key),
                Some(serde_json::json!({"url": url})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        created["webhook_endpoint"]["id"].as_str().unwrap().to_string()
    }

    /// Posts an event to the ingest port.
    pub async fn ingest(&self, org: &str, event_type: &str, data: Value) -> (StatusCode, Value) {
        let res = self
            .http
            .post(format!("{}/v1/organizations/{org}/events", self.ingest_base))
            .bearer_auth(INGEST_TOKEN)
            .json(&serde_json::json!({"type": event_type, "data": data}))
            .send()
            .await
            .unwrap();
        let status = res.status();
        (status, res.json().await.unwrap())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
