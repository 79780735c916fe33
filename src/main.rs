//! The `capy-webhooks` binary: parses the command line and starts components.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::sync::watch;
use tracing::info;

use capy_webhooks::api::{self, ApiConfig};
use capy_webhooks::auth::Authenticator;
use capy_webhooks::auth::api_keys::{self, ApiKeyIndex};
use capy_webhooks::auth::clerk::{ClerkConfig, ClerkVerifier, JwksSource, check_jwks_url, jwks_http_client};
use capy_webhooks::catalog::CatalogWatch;
use capy_webhooks::controller::{self, ControllerConfig};
use capy_webhooks::controller_lease::{CONTROLLER_LEASE, Leadership, LeaseConfig, default_identity};
use capy_webhooks::delivery::egress::EgressProxy;
use capy_webhooks::delivery::schedule::{DEFAULT_SCHEDULE, RetrySchedule};
use capy_webhooks::delivery::sender::SenderConfig;
use capy_webhooks::delivery::ssrf::TargetPolicy;
use capy_webhooks::delivery_log::{LogConfig, WriteBudget, parse_bytes};
use capy_webhooks::dispatcher::{Dispatcher, DispatcherConfig};
use capy_webhooks::duration::parse_flag_duration;
use capy_webhooks::endpoints::{self, EndpointCache};
use capy_webhooks::forwarder::Router;
use capy_webhooks::http::ServerLimits;
use capy_webhooks::ingest::{IngestConfig, Replicas};
use capy_webhooks::operational::{Emitter, OperationalTarget};
use capy_webhooks::replica_key::ReplicaKey;
use capy_webhooks::resources::{CrdKind, Scope, all_crds_yaml, kind_crd_yaml};
use capy_webhooks::shards::coordinator::{self, CoordinatorConfig};
use capy_webhooks::telemetry::{self, LogFormat, Metrics, Readiness, ReadyHandle};
use capy_webhooks::tenancy::NamespaceBinding;
use capy_webhooks::validation::UrlPolicy;
use capy_webhooks::work::WorkHandle;

/// mimalloc instead of glibc's allocator: profiled under dispatch load (`make bench`), glibc's
/// malloc and free took about a fifth of the operator's CPU. See [`disable_transparent_huge_pages`].
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Opts this process out of transparent huge pages. mimalloc commits its arenas eagerly, and
/// where THP is `always` (common on nodes) the kernel backs them with 2 MiB pages: measured, idle
/// RSS went from 18 to 31 MiB and 10,000 endpoints from 82 to 102 MiB. This is what
/// `MIMALLOC_ALLOW_THP=0` does, done here so that no environment is needed; pages touched before
/// this call (a few, at start) keep what they got.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and only sets a flag of this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// CapyDB outbound webhooks, as a Kubernetes operator.
///
/// Every flag can also be set with an environment variable CAPY_WEBHOOKS_<FLAG>
/// (upper case, `_` for `-`), shown in each flag's help.
#[derive(Parser, Debug)]
#[command(name = "capy-webhooks", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator's components.
    Run(Box<RunArgs>),
    /// Print the CRDs as YAML (what `crds/` holds): every one, or the one of `--kind`.
    Crd {
        /// Only this kind's CRD (the content of its file in `crds/`).
        #[arg(long, value_enum)]
        kind: Option<CrdKindArg>,
    },
    /// Print the REST API's OpenAPI 3.1 document (what `GET /openapi.json` serves).
    Openapi,
    /// Mint, list and revoke REST API keys (stored hashed as Secrets).
    #[command(subcommand)]
    ApiKey(ApiKeyCommand),
    /// Administer the delivery logs.
    #[command(subcommand)]
    DeliveryLog(DeliveryLogCommand),
}

/// A kind whose CRD `capy-webhooks crd --kind` prints.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum CrdKindArg {
    /// WebhookEndpoint (crds/webhookendpoints.webhooks.capydb.io.yaml).
    #[value(name = "WebhookEndpoint")]
    WebhookEndpoint,
    /// WebhookEventType, the event-type catalog (crds/webhookeventtypes.webhooks.capydb.io.yaml).
    #[value(name = "WebhookEventType")]
    WebhookEventType,
}

#[derive(Subcommand, Debug)]
enum DeliveryLogCommand {
    /// Upgrade step from a build that wrote segments without MACs: signs every
    /// delivery-log segment that carries no MAC, once, so its pending deliveries resume. Run it
    /// only when you know every such ConfigMap was written by the operator: it trusts whatever
    /// carries the log's labels now. The operator itself never signs what it did not write.
    /// Run it with the operator scaled to zero, before the new version starts.
    SignUnsigned {
        /// Namespace whose segments are signed (default: the in-cluster namespace, else
        /// `default`).
        #[arg(long, conflicts_with = "all_namespaces")]
        namespace: Option<String>,
        /// Sign the segments of every namespace.
        #[arg(long)]
        all_namespaces: bool,
        /// Namespace of the operator's Secrets, where the MAC key is (default: `--namespace`).
        #[arg(long)]
        home_namespace: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ApiKeyCommand {
    /// Mint a key for an organization (or one of its projects); the key is printed once.
    Create {
        /// Organization id.
        #[arg(long)]
        org: String,
        /// Project id, for a project-scoped key.
        #[arg(long)]
        project: Option<String>,
        /// A name to recognise the key by.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        ns: NamespaceArg,
    },
    /// List an organization's keys (never the keys themselves).
    List {
        /// Organization id.
        #[arg(long)]
        org: String,
        #[command(flatten)]
        ns: NamespaceArg,
    },
    /// Revoke a key by id; it stops working within seconds.
    Revoke {
        /// Key id, as printed by `create` and `list`.
        id: String,
        #[command(flatten)]
        ns: NamespaceArg,
    },
}

#[derive(Args, Debug)]
struct NamespaceArg {
    /// Namespace holding the API keys (default: the in-cluster namespace, else `default`).
    #[arg(long, env = "CAPY_WEBHOOKS_NAMESPACE")]
    namespace: Option<String>,
}

/// A component `run` can start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Component {
    /// Reconciles WebhookEndpoints and owns their signing Secrets.
    Controller,
    /// The public REST API.
    Api,
    /// Event ingest (internal port) and signed delivery with retries.
    Dispatcher,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Components to start, comma separated.
    #[arg(
        long,
        env = "CAPY_WEBHOOKS_COMPONENTS",
        value_delimiter = ',',
        default_value = "api,controller,dispatcher"
    )]
    components: Vec<Component>,

    /// Namespace to serve (default: the in-cluster namespace, else `default`).
    #[arg(long, env = "CAPY_WEBHOOKS_NAMESPACE", conflicts_with = "all_namespaces")]
    namespace: Option<String>,

    /// Serve every namespace (needs the chart's ClusterRole).
    #[arg(long, env = "CAPY_WEBHOOKS_ALL_NAMESPACES")]
    all_namespaces: bool,

    /// Address of the public REST API.
    #[arg(long, env = "CAPY_WEBHOOKS_API_LISTEN", default_value = "0.0.0.0:8080")]
    api_listen: SocketAddr,

    /// Largest REST request body in bytes; larger bodies get 413.
    #[arg(long, env = "CAPY_WEBHOOKS_API_BODY_LIMIT", default_value_t = 64 * 1024)]
    api_body_limit: usize,

    /// How long create and rotate-secret wait for the controller before answering 503.
    #[arg(long, env = "CAPY_WEBHOOKS_CONTROLLER_WAIT", default_value = "10s", value_parser = parse_flag_duration)]
    controller_wait: Duration,

    /// Namespace of API keys and of endpoints created over REST (default: the served namespace,
    /// else the in-cluster namespace, else `default`).
    #[arg(long, env = "CAPY_WEBHOOKS_HOME_NAMESPACE")]
    home_namespace: Option<String>,

    /// JWKS URL of the Clerk instance, for session tokens.
    #[arg(
        long,
        env = "CAPY_WEBHOOKS_CLERK_JWKS_URL",
        conflicts_with = "clerk_jwks_file",
        requires = "clerk_issuer"
    )]
    clerk_jwks_url: Option<String>,

    /// JWKS file of the Clerk instance, for session tokens.
    #[arg(long, env = "CAPY_WEBHOOKS_CLERK_JWKS_FILE", requires = "clerk_issuer")]
    clerk_jwks_file: Option<PathBuf>,

    /// Required `iss` of Clerk session tokens (e.g. https://clerk.example.com).
    #[arg(long, env = "CAPY_WEBHOOKS_CLERK_ISSUER")]
    clerk_issuer: Option<String>,

    /// Accepted `azp` values of Clerk session tokens, comma separated (empty: not checked).
    #[arg(long, env = "CAPY_WEBHOOKS_CLERK_AUTHORIZED_PARTIES", value_delimiter = ',')]
    clerk_authorized_parties: Vec<String>,

    /// Most endpoints one organization may have; creating one more over REST is 409.
    #[arg(long, env = "CAPY_WEBHOOKS_MAX_ENDPOINTS_PER_ORGANIZATION", default_value_t = 100)]
    max_endpoints_per_organization: usize,

    /// Requests per second per organization on the routes that send or read deliveries (test,
    /// retry, deliveries), with bursts of 20; beyond it 429 with Retry-After. 0: unlimited.
    #[arg(long, env = "CAPY_WEBHOOKS_ORGANIZATION_RATE_LIMIT", default_value_t = 5.0)]
    organization_rate_limit: f64,

    /// Organization roles a Clerk session needs, comma separated (e.g. org:admin); a session with
    /// another role gets 403. Empty: every member of the organization.
    #[arg(long, env = "CAPY_WEBHOOKS_CLERK_REQUIRED_ROLE", value_delimiter = ',')]
    clerk_required_role: Vec<String>,

    /// How long a portal session (POST .../portal-sessions) lasts, at most 24h.
    #[arg(long, env = "CAPY_WEBHOOKS_PORTAL_SESSION_TTL", default_value = "1h", value_parser = capy_webhooks::api::portal::parse_session_ttl)]
    portal_session_ttl: Duration,

    /// Public base URL of this server, used in portal links (e.g. https://webhooks.example.com).
    /// Unset: the scheme (X-Forwarded-Proto) and Host of the request that opened the session.
    #[arg(long, env = "CAPY_WEBHOOKS_PORTAL_URL", value_parser = capy_webhooks::api::portal::parse_portal_url)]
    portal_url: Option<String>,

    /// How long a rotated-out signing secret keeps co-signing deliveries (e.g. 24h, 30m).
    #[arg(long, env = "CAPY_WEBHOOKS_ROTATION_GRACE_PERIOD", default_value = "24h", value_parser = parse_flag_duration)]
    rotation_grace_period: Duration,

    /// Address of the internal event-ingest port.
    #[arg(long, env = "CAPY_WEBHOOKS_INGEST_LISTEN", default_value = "0.0.0.0:8081")]
    ingest_listen: SocketAddr,

    /// File holding the bearer token producers present to the ingest port (required by the
    /// dispatcher; mount it from a Secret).
    #[arg(long, env = "CAPY_WEBHOOKS_INGEST_TOKEN_FILE")]
    ingest_token_file: Option<PathBuf>,

    /// Largest event body accepted by the ingest port, in bytes; larger bodies get 413.
    #[arg(long, env = "CAPY_WEBHOOKS_INGEST_PAYLOAD_LIMIT", default_value_t = 64 * 1024)]
    ingest_payload_limit: usize,

    /// Refuse (400) events whose type is not in the event-type catalog (the WebhookEventTypes of
    /// the home namespace). Without it they are accepted and counted
    /// (`capy_webhooks_events_outside_catalog_total`). An empty catalog accepts every type either way.
    #[arg(long, env = "CAPY_WEBHOOKS_STRICT_EVENT_TYPES")]
    strict_event_types: bool,

    /// Delays before each attempt, comma separated; its length is the default max_attempts.
    #[arg(
        long,
        env = "CAPY_WEBHOOKS_RETRY_SCHEDULE",
        default_value = DEFAULT_SCHEDULE
    )]
    retry_schedule: RetrySchedule,

    /// Finished deliveries kept per endpoint in its log (every pending one is kept).
    #[arg(long, env = "CAPY_WEBHOOKS_RETAIN_FINISHED_DELIVERIES", default_value_t = 100)]
    retain_finished_deliveries: usize,

    /// Bytes per second the dispatcher may write through the API server into etcd (delivery-log
    /// segments and status summaries), as a number or with Ki, Mi, Gi: beyond it, ingest, test and
    /// retry answer 503 with Retry-After while accepted deliveries keep flowing. The default keeps
    /// a default 2 GiB etcd with 5-minute compaction far from its quota (README, "Sizing"); 0 turns
    /// the budget off.
    #[arg(long, env = "CAPY_WEBHOOKS_LOG_WRITE_BUDGET", default_value = "512Ki", value_parser = parse_bytes)]
    log_write_budget: u64,

    /// Attempts in flight per endpoint at most.
    #[arg(long, env = "CAPY_WEBHOOKS_PER_ENDPOINT_CONCURRENCY", default_value_t = 8)]
    per_endpoint_concurrency: usize,

    /// TCP connect timeout of an attempt.
    #[arg(long, env = "CAPY_WEBHOOKS_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_flag_duration)]
    connect_timeout: Duration,

    /// Total timeout of an attempt, response included.
    #[arg(long, env = "CAPY_WEBHOOKS_ATTEMPT_TIMEOUT", default_value = "15s", value_parser = parse_flag_duration)]
    attempt_timeout: Duration,

    /// Status summaries are written at most this often per endpoint.
    #[arg(long, env = "CAPY_WEBHOOKS_SUMMARY_INTERVAL", default_value = "10s", value_parser = parse_flag_duration)]
    summary_interval: Duration,

    /// Disable an endpoint whose every delivery attempt failed for this long.
    #[arg(long, env = "CAPY_WEBHOOKS_AUTO_DISABLE_AFTER", default_value = "5d", value_parser = parse_flag_duration)]
    auto_disable_after: Duration,

    /// Payloads of finished deliveries older than this are erased from the delivery log (the
    /// records stay, shown with `payload: null`); `0s` keeps them until the records go.
    #[arg(long, env = "CAPY_WEBHOOKS_PAYLOAD_RETENTION", default_value = "30d", value_parser = parse_flag_duration)]
    payload_retention: Duration,

    /// On SIGTERM, how long in-flight attempts may take to finish.
    #[arg(long, env = "CAPY_WEBHOOKS_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_flag_duration)]
    shutdown_grace: Duration,

    /// Deliver to loopback, private, link-local and CGNAT addresses (metadata addresses stay refused).
    #[arg(long, env = "CAPY_WEBHOOKS_ALLOW_PRIVATE_TARGETS")]
    allow_private_targets: bool,

    /// Accept plain http:// endpoint URLs (development only).
    #[arg(long, env = "CAPY_WEBHOOKS_ALLOW_HTTP")]
    allow_http: bool,

    /// PEM file of certificate authorities trusted for receivers besides the system's roots
    /// (receivers inside the cluster, or behind a private CA).
    #[arg(long, env = "CAPY_WEBHOOKS_RECEIVER_CA_FILE")]
    receiver_ca_file: Option<PathBuf>,

    /// Send operational webhooks (endpoint.created/updated/deleted/disabled/enabled,
    /// delivery.exhausted) to this URL, signed like every delivery (Standard Webhooks `v1`), retried
    /// on the retry schedule and subject to the same target rules (--allow-http,
    /// --allow-private-targets). Needs --operational-webhook-secret-file.
    #[arg(
        long,
        env = "CAPY_WEBHOOKS_OPERATIONAL_WEBHOOK_URL",
        hide_env_values = true,
        requires = "operational_webhook_secret_file"
    )]
    operational_webhook_url: Option<String>,

    /// File holding the `whsec_` secret that signs operational webhooks (a mounted Secret; never
    /// a flag's value or an environment variable).
    #[arg(
        long,
        env = "CAPY_WEBHOOKS_OPERATIONAL_WEBHOOK_SECRET_FILE",
        requires = "operational_webhook_url"
    )]
    operational_webhook_secret_file: Option<PathBuf>,

    /// Send every delivery through this HTTP proxy with CONNECT (http://[user:password@]host:port),
    /// for a static source address. The proxy is asked to connect to the receiver's checked IP
    /// address, never its name. The environment variable keeps credentials off the command line.
    // A String, read by EgressProxy::parse below: clap's own errors would repeat the value,
    // password included.
    #[arg(long, env = "CAPY_WEBHOOKS_EGRESS_PROXY", hide_env_values = true)]
    egress_proxy: Option<String>,

    /// Address of the operations port: /healthz, /readyz and /metrics (OpenMetrics text).
    #[arg(long, env = "CAPY_WEBHOOKS_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,

    /// This replica's name in Leases (`holderIdentity`). Default: $POD_NAME, else the host name
    /// with a random suffix.
    #[arg(long, env = "CAPY_WEBHOOKS_IDENTITY")]
    identity: Option<String>,

    /// How the other replicas reach this one's internal (ingest) port, as host:port. Default:
    /// $POD_IP, else the ingest address's host (127.0.0.1 when it listens on every address),
    /// with the ingest port.
    #[arg(long, env = "CAPY_WEBHOOKS_ADVERTISE_ADDRESS")]
    advertise_address: Option<String>,

    /// How long a Lease stays valid without renewal: after a replica dies, another takes over its
    /// Leases within this time (plus a few seconds). Whole seconds, at least 2s.
    #[arg(long, env = "CAPY_WEBHOOKS_LEASE_DURATION", default_value = "15s", value_parser = parse_flag_duration)]
    lease_duration: Duration,

    /// Time a client has to send a request's headers, on every port; then the connection closes.
    #[arg(long, env = "CAPY_WEBHOOKS_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_flag_duration)]
    http_header_timeout: Duration,

    /// A connection idle this long (no bytes, no request in flight) is closed, on every port.
    #[arg(long, env = "CAPY_WEBHOOKS_HTTP_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_flag_duration)]
    http_idle_timeout: Duration,

    /// Connections served at once per port; more wait in the listen backlog.
    #[arg(long, env = "CAPY_WEBHOOKS_HTTP_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    http_max_connections: u32,

    /// Log line format.
    #[arg(long, env = "CAPY_WEBHOOKS_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,

    /// Export traces over OTLP/HTTP (protobuf) to this base URL (`/v1/traces` is appended), e.g.
    /// `http://otel-collector:4318`. Without it, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as it
    /// is) or `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL); with none of them, traces are off.
    #[arg(long, env = "CAPY_WEBHOOKS_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,

    /// Share of traces started here that are sampled (0 to 1). Parent-based: a request whose
    /// `traceparent` says sampled (or not) is sampled (or not) whatever the ratio.
    #[arg(long, env = "CAPY_WEBHOOKS_TRACE_SAMPLING_RATIO", default_value = "1.0", value_parser = capy_webhooks::traces::parse_sampling_ratio)]
    trace_sampling_ratio: f64,
}

fn read_ingest_token(path: &std::path::Path) -> anyhow::Result<String> {
    let token =
        std::fs::read_to_string(path).with_context(|| format!("reading the ingest token from {}", path.display()))?;
    let token = token.trim().to_string();
    anyhow::ensure!(
        token.len() >= 16,
        "the ingest token in {} is shorter than 16 characters",
        path.display()
    );
    Ok(token)
}

/// The address other replicas forward to: `--advertise-address`, else `$POD_IP` or the ingest
/// address's host, with the ingest port.
fn advertise_address(given: Option<&str>, ingest: SocketAddr) -> String {
    if let Some(address) = given.filter(|a| !a.is_empty()) {
        return address.to_string();
    }
    let host = std::env::var("POD_IP")
        .ok()
        .filter(|ip| !ip.is_empty())
        .unwrap_or_else(|| {
            if ingest.ip().is_unspecified() {
                "127.0.0.1".into()
            } else {
                ingest.ip().to_string()
            }
        });
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host
    };
    format!("{host}:{}", ingest.port())
}

fn in_cluster_namespace() -> Option<String> {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Resolves when SIGTERM or Ctrl-C arrives.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn default_namespace(given: Option<String>) -> String {
    given.or_else(in_cluster_namespace).unwrap_or_else(|| "default".into())
}

async fn kube_client() -> anyhow::Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("cannot build a Kubernetes client from the kubeconfig or in-cluster settings")
}

async fn api_key_command(command: ApiKeyCommand) -> anyhow::Result<()> {
    let client = kube_client().await?;
    match command {
        ApiKeyCommand::Create { org, project, name, ns } => {
            let ns = default_namespace(ns.namespace);
            let (record, key) = api_keys::create_key(&client, &ns, &org, project.as_deref(), name.as_deref())
                .await
                .context("creating the API key Secret")?;
            eprintln!(
                "API key {} created for organization {} in namespace {ns}; it is shown only once:",
                record.id, record.organization_id
            );
            println!("{key}");
        }
        ApiKeyCommand::List { org, ns } => {
            let ns = default_namespace(ns.namespace);
            let keys = api_keys::list_keys(&client, &ns, &org)
                .await
                .context("listing API keys")?;
            println!("{:<28} {:<24} {:<16} CREATED", "ID", "NAME", "PROJECT");
            for k in keys {
                println!(
                    "{:<28} {:<24} {:<16} {}",
                    k.id,
                    k.name,
                    k.project_id.as_deref().unwrap_or("-"),
                    k.created_at
                );
            }
        }
        ApiKeyCommand::Revoke { id, ns } => {
            let ns = default_namespace(ns.namespace);
            if !api_keys::revoke_key(&client, &ns, &id)
                .await
                .context("revoking the API key")?
            {
                anyhow::bail!("no API key {id} in namespace {ns}");
            }
            eprintln!("API key {id} revoked");
        }
    }
    Ok(())
}

async fn delivery_log_command(command: DeliveryLogCommand) -> anyhow::Result<()> {
    let client = kube_client().await?;
    match command {
        DeliveryLogCommand::SignUnsigned {
            namespace,
            all_namespaces,
            home_namespace,
        } => {
            let scope = if all_namespaces {
                Scope::AllNamespaces
            } else {
                Scope::Namespace(default_namespace(namespace.clone()))
            };
            let home_namespace = home_namespace.unwrap_or_else(|| default_namespace(namespace));
            let signed = capy_webhooks::delivery_log::sign_unsigned_segments(&client, &home_namespace, &scope)
                .await
                .context("signing unsigned delivery-log segments")?;
            for name in &signed {
                println!("{name}");
            }
            eprintln!("{} unsigned delivery-log segment(s) signed", signed.len());
        }
    }
    Ok(())
}

/// The REST API's authenticator: the API-key index of `home_namespace`, and Clerk sessions when
/// configured (its JWKS loaded first).
async fn authenticator(
    clerk: Option<ClerkConfig>,
    client: &kube::Client,
    home_namespace: &str,
) -> anyhow::Result<Authenticator> {
    let index = ApiKeyIndex::new();
    tokio::spawn(index.clone().run(client.clone(), home_namespace.to_string()));
    let clerk = match clerk {
        Some(config) => {
            let http = jwks_http_client()?;
            let verifier = ClerkVerifier::new(config, http)
                .await
                .map_err(|e| anyhow::anyhow!("loading the Clerk JWKS: {e}"))?;
            Some(Arc::new(verifier))
        }
        None => None,
    };
    index.wait_ready().await;
    Ok(Authenticator::new(index, clerk))
}

/// Everything `run` decides from the command line before it starts anything.
struct Setup {
    /// Namespaces served.
    scope: Scope,
    /// Namespace of the operator's own objects (Leases, keys, endpoints created over REST).
    home_namespace: String,
    /// Timeouts and connection cap of every port.
    server_limits: ServerLimits,
    /// The controller's settings, when it runs.
    controller: Option<ControllerConfig>,
    /// The dispatcher's and its ingest port's settings, when it runs.
    dispatcher: Option<DispatcherSetup>,
    /// The REST API's settings, when it runs.
    api: Option<ApiSetup>,
    /// The event-type catalog the REST API and ingest read (watched only when one of them runs).
    catalog: CatalogWatch,
}

/// The dispatcher's settings, and its ingest port's.
struct DispatcherSetup {
    config: DispatcherConfig,
    /// File holding the ingest bearer token.
    token_file: PathBuf,
    payload_limit: usize,
    /// `--strict-event-types`.
    strict_event_types: bool,
}

/// The REST API's settings, and its Clerk sessions'.
struct ApiSetup {
    config: ApiConfig,
    clerk: Option<ClerkConfig>,
}

/// `given`, else the in-cluster namespace, else `default`.
/// `--egress-proxy`, read without ever repeating the URL (it may hold a password); the proxy's
/// address (never its credentials) is logged once.
fn egress_proxy(url: Option<&str>) -> anyhow::Result<Option<EgressProxy>> {
    let Some(url) = url.filter(|u| !u.trim().is_empty()) else {
        return Ok(None);
    };
    let proxy = EgressProxy::parse(url).map_err(|reason| anyhow::anyhow!("--egress-proxy: {reason}"))?;
    info!(
        proxy = %proxy.address(),
        credentials = proxy.has_credentials(),
        "deliveries go through the egress proxy (CONNECT to each receiver's checked address)"
    );
    Ok(Some(proxy))
}

fn namespace_or(given: Option<&str>, in_cluster: Option<&str>) -> String {
    given.or(in_cluster).unwrap_or("default").to_string()
}

/// Which namespaces are served, and the operator's home namespace: `--home-namespace`, else the
/// served namespace, else (serving all of them) the in-cluster namespace, else `default`.
fn scope_and_home(args: &RunArgs, in_cluster: Option<&str>) -> (Scope, String) {
    let scope = if args.all_namespaces {
        Scope::AllNamespaces
    } else {
        Scope::Namespace(namespace_or(args.namespace.as_deref(), in_cluster))
    };
    let home = match (&args.home_namespace, &scope) {
        (Some(ns), _) => ns.clone(),
        (None, Scope::Namespace(ns)) => ns.clone(),
        (None, Scope::AllNamespaces) => namespace_or(None, in_cluster),
    };
    (scope, home)
}

/// Where operational webhooks go, when `--operational-webhook-url` is given: its URL checked like
/// an endpoint's, its secret read from the file (whose content no error repeats).
fn operational_target(args: &RunArgs, policy: UrlPolicy) -> anyhow::Result<Option<OperationalTarget>> {
    let (Some(url), Some(file)) = (&args.operational_webhook_url, &args.operational_webhook_secret_file) else {
        return Ok(None);
    };
    capy_webhooks::validation::validate_url(url, policy)
        .map_err(|e| anyhow::anyhow!("--operational-webhook-url: {e}"))?;
    let content = std::fs::read_to_string(file)
        .with_context(|| format!("reading the operational webhook secret from {}", file.display()))?;
    let secret = capy_webhooks::operational::parse_secret_file(&content)?;
    Ok(Some(OperationalTarget {
        url: url.clone(),
        secret,
    }))
}

/// Clerk session settings, when a JWKS is given.
fn clerk_config(args: &RunArgs) -> anyhow::Result<Option<ClerkConfig>> {
    let jwks = match (&args.clerk_jwks_url, &args.clerk_jwks_file) {
        (Some(url), _) => JwksSource::Url(url.clone()),
        (None, Some(file)) => JwksSource::File(file.clone()),
        (None, None) => return Ok(None),
    };
    let issuer = args
        .clerk_issuer
        .clone()
        .context("--clerk-issuer is required with a JWKS")?;
    if let JwksSource::Url(url) = &jwks {
        check_jwks_url(url, args.allow_http).map_err(anyhow::Error::msg)?;
    }
    let non_empty = |values: &[String]| values.iter().filter(|v| !v.is_empty()).cloned().collect();
    let mut config = ClerkConfig::new(jwks, issuer);
    config.authorized_parties = non_empty(&args.clerk_authorized_parties);
    config.required_roles = non_empty(&args.clerk_required_role);
    Ok(Some(config))
}

/// Builds every started component's configuration from the parsed flags, the in-cluster
/// namespace (read by the caller) and the process's metrics and readiness; registers each
/// component to start with `readiness`. Starts nothing, reads nothing: a flag combination that
/// cannot run is refused here, before anything starts.
fn configure(
    args: &RunArgs,
    in_cluster: Option<&str>,
    metrics: &Metrics,
    readiness: &Readiness,
) -> anyhow::Result<Setup> {
    let (scope, home_namespace) = scope_and_home(args, in_cluster);
    // One catalog for the REST API and ingest, filled by a watch once the process runs.
    let catalog = CatalogWatch::new();
    let url_policy = UrlPolicy {
        allow_http: args.allow_http,
    };
    let server_limits = ServerLimits {
        header_read_timeout: args.http_header_timeout,
        idle_timeout: args.http_idle_timeout,
        max_connections: args.http_max_connections as usize,
    };
    let wants = |c: Component| args.components.contains(&c);
    // Registered (not ready) before the operations port opens, in this order.
    let ready = |c: Component, name: &str| {
        if wants(c) {
            readiness.register(name)
        } else {
            ReadyHandle::detached()
        }
    };
    let controller_ready = ready(Component::Controller, "controller");
    let api_ready = ready(Component::Api, "api");
    let dispatcher_ready = ready(Component::Dispatcher, "dispatcher");

    // One emitter per process: the controller (endpoint.*) and the dispatcher
    // (delivery.exhausted) both hand their events to the owner of the operational log through it.
    let emitter = Emitter::default();
    if args.operational_webhook_url.is_some() && !wants(Component::Dispatcher) {
        anyhow::bail!("--operational-webhook-url needs the dispatcher component in the same process");
    }
    let controller = wants(Component::Controller).then(|| ControllerConfig {
        scope: scope.clone(),
        rotation_grace_period: args.rotation_grace_period,
        url_policy,
        metrics: metrics.clone(),
        ready: controller_ready,
        operational: args.operational_webhook_url.is_some().then(|| emitter.clone()),
    });
    let dispatcher = if wants(Component::Dispatcher) {
        let token_file = args
            .ingest_token_file
            .clone()
            .context("the dispatcher needs --ingest-token-file (the bearer token of the ingest port)")?;
        let config = DispatcherConfig {
            home_namespace: home_namespace.clone(),
            scope: scope.clone(),
            schedule: args.retry_schedule.clone(),
            log: LogConfig {
                max_finished: args.retain_finished_deliveries,
                ..LogConfig::default()
            },
            sender: SenderConfig {
                connect_timeout: args.connect_timeout,
                total_timeout: args.attempt_timeout,
                policy: TargetPolicy {
                    allow_private: args.allow_private_targets,
                    allow_metadata: false,
                },
                allow_http: args.allow_http,
                extra_roots_pem: match &args.receiver_ca_file {
                    Some(path) => std::fs::read(path)
                        .with_context(|| format!("reading the receiver CAs from {}", path.display()))?,
                    None => Vec::new(),
                },
                egress_proxy: egress_proxy(args.egress_proxy.as_deref())?,
                ..SenderConfig::default()
            },
            per_endpoint_concurrency: args.per_endpoint_concurrency,
            summary_interval: args.summary_interval,
            auto_disable_after: args.auto_disable_after,
            payload_retention: (!args.payload_retention.is_zero()).then_some(args.payload_retention),
            budget: WriteBudget::new(args.log_write_budget),
            persist_timeout: Duration::from_secs(10),
            shutdown_grace: args.shutdown_grace,
            metrics: metrics.clone(),
            ready: dispatcher_ready,
            operational: operational_target(args, url_policy)?,
            emitter: emitter.clone(),
        };
        Some(DispatcherSetup {
            config,
            token_file,
            payload_limit: args.ingest_payload_limit,
            strict_event_types: args.strict_event_types,
        })
    } else {
        None
    };
    let api = if wants(Component::Api) {
        let config = ApiConfig {
            server_limits,
            max_endpoints_per_organization: args.max_endpoints_per_organization,
            organization_rate_limit: args.organization_rate_limit,
            scope: scope.clone(),
            home_namespace: home_namespace.clone(),
            url_policy,
            body_limit: args.api_body_limit,
            controller_wait: args.controller_wait,
            metrics: metrics.clone(),
            ready: api_ready,
            portal_session_ttl: jiff::SignedDuration::try_from(args.portal_session_ttl)?,
            portal_url: args.portal_url.clone(),
            catalog: catalog.clone(),
        };
        Some(ApiSetup {
            config,
            clerk: clerk_config(args)?,
        })
    } else {
        None
    };
    Ok(Setup {
        scope,
        home_namespace,
        server_limits,
        controller,
        dispatcher,
        api,
        catalog,
    })
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let env = |name: &str| std::env::var(name).ok();
    let endpoint = capy_webhooks::traces::traces_endpoint(
        args.otlp_endpoint.as_deref(),
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").as_deref(),
        env("OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
    );
    let tracing = match &endpoint {
        Some(endpoint) => Some(
            capy_webhooks::traces::Tracing::start(endpoint, args.trace_sampling_ratio).map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let (tracing, tracer) = tracing.unzip();
    telemetry::init(args.log_format, tracer);
    if let Some(endpoint) = &endpoint {
        // The URL only: export headers (OTEL_EXPORTER_OTLP_HEADERS) may hold credentials.
        info!(endpoint = %capy_webhooks::traces::shown(endpoint), sampling_ratio = args.trace_sampling_ratio, "exporting traces");
    }
    let result = run_operator(args).await;
    if let Some(tracing) = tracing {
        // Shutting down waits for the last export, which runs on this runtime: off its workers.
        let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
    }
    result
}

async fn run_operator(args: RunArgs) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let readiness = Readiness::new();
    let in_cluster = in_cluster_namespace();
    let Setup {
        scope,
        home_namespace,
        server_limits,
        controller,
        dispatcher,
        api,
        catalog,
    } = configure(&args, in_cluster.as_deref(), &metrics, &readiness)?;
    info!(version = env!("CARGO_PKG_VERSION"), components = ?args.components, ?scope, "capy-webhooks starting");

    // One shutdown signal fans out to every component.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown requested");
        let _ = stop_tx.send(true);
    });
    let stopped = {
        let stop_rx = stop_rx.clone();
        move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        }
    };

    // The operations port comes first, so probes are answered during start-up: every component
    // to start is registered (not ready) before it opens.
    let mut tasks = Components::new();
    let ops_listener = capy_webhooks::http::bind(args.metrics_listen, "operations port").await?;
    tasks.spawn(capy_webhooks::ops::run(
        metrics.clone(),
        readiness.clone(),
        ops_listener,
        server_limits,
        stopped(),
    ));

    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let client = kube_client().await?;
    // Every component reads WebhookEndpoints: an installation that forbids it ends the process
    // here, whichever components run, instead of leaving them waiting for caches that never fill.
    let listable = endpoints::wait_until_listable(client.clone(), &scope);
    if start_step(&mut tasks, stopped(), listable).await?.is_none() {
        return until_all_end(tasks).await;
    }
    // One watch-backed endpoint cache for the whole process: the controller, the REST API and
    // the dispatcher all read it.
    let binding = NamespaceBinding::start(client.clone(), &scope, &home_namespace);
    let cache = EndpointCache::start(client.clone(), &scope, binding, controller.is_some());
    // The catalog lives in the home namespace only: the namespaced chart needs no cluster role.
    if api.is_some() || dispatcher.is_some() {
        tokio::spawn(catalog.clone().run(client.clone(), home_namespace.clone()));
    }
    if let (Some(feed), Some(config)) = (cache.controller_feed(), controller) {
        // One controller at a time among the replicas: the holder of the controller Lease.
        let leases = LeaseConfig {
            namespace: home_namespace.clone(),
            identity: identity.clone(),
            duration: args.lease_duration,
        };
        info!(identity = %leases.identity, lease = CONTROLLER_LEASE, "competing for the controller Lease");
        let leadership = Leadership::compete(client.clone(), &leases, CONTROLLER_LEASE).await?;
        let run = controller::run(client.clone(), config, feed, leadership.leading(), stopped());
        tasks.spawn(async move {
            let result = run.await;
            // Stopped: hand the Lease over now rather than after it expires.
            leadership.release().await;
            result
        });
    }
    let dispatcher = if let Some(setup) = dispatcher {
        let token = read_ingest_token(&setup.token_file)?;
        let ingest_listener = capy_webhooks::http::bind(args.ingest_listen, "ingest port").await?;
        // Dispatch is partitioned into shards, each held by one replica through its Lease.
        let ownership = CoordinatorConfig {
            namespace: home_namespace.clone(),
            identity: identity.clone(),
            address: advertise_address(args.advertise_address.as_deref(), ingest_listener.local_addr()?),
            duration: args.lease_duration,
            drain_timeout: args.shutdown_grace + Duration::from_secs(5),
            metrics: metrics.clone(),
            readiness: readiness.clone(),
        };
        let start = coordinator::start(client.clone(), ownership, stop_rx.clone());
        let Some((shards, coordinator)) = start_step(&mut tasks, stopped(), start).await? else {
            return until_all_end(tasks).await;
        };
        tasks.spawn(async move { coordinator.await.context("the shard coordinator panicked") });
        let placement = shards.placement.clone();
        let emitter = setup.config.emitter.clone();
        let start = Dispatcher::start(client.clone(), cache.clone(), setup.config, shards, stop_rx.clone());
        let Some(dispatcher) = start_step(&mut tasks, stopped(), start).await? else {
            return until_all_end(tasks).await;
        };
        // Replicas sign the work they forward to each other with a key only the operator reads.
        let replica_key = ReplicaKey::load_or_create(&client, &home_namespace);
        let Some(replica_key) = start_step(&mut tasks, stopped(), replica_key).await? else {
            return until_all_end(tasks).await;
        };
        let here = WorkHandle::new(dispatcher.clone());
        let router = Router::new(
            placement,
            here.clone(),
            &token,
            replica_key.clone(),
            &identity,
            // The owner answers within its persist timeout (10 s); a frozen owner must not hold
            // a producer much longer than that.
            Duration::from_secs(12),
        )?;
        let work = WorkHandle::new(router);
        // Operational events go to the owner of the operational log from here on.
        emitter.connect(work.clone());
        let ingest = IngestConfig {
            server_limits,
            token,
            payload_limit: setup.payload_limit,
            idempotency_window: Duration::from_secs(24 * 3600),
            idempotency_capacity: 100_000,
            metrics: metrics.clone(),
            replicas: Some(Replicas { key: replica_key, here }),
            catalog: catalog.clone(),
            strict_event_types: setup.strict_event_types,
        };
        tasks.spawn(capy_webhooks::ingest::run(
            work.clone(),
            ingest,
            ingest_listener,
            stopped(),
        ));
        let draining = dispatcher.clone();
        let stop = stopped();
        tasks.spawn(async move {
            stop.await;
            draining.wait_stopped().await;
            Ok(())
        });
        Some(work)
    } else {
        None
    };
    if let Some(setup) = api {
        let listener = capy_webhooks::http::bind(args.api_listen, "REST API").await?;
        let start = authenticator(setup.clerk, &client, &home_namespace);
        let Some(auth) = start_step(&mut tasks, stopped(), start).await? else {
            return until_all_end(tasks).await;
        };
        tasks.spawn(api::run(
            client.clone(),
            setup.config,
            auth,
            cache,
            dispatcher,
            listener,
            stopped(),
        ));
    }
    until_all_end(tasks).await
}

/// Waits until every component has ended; one that fails ends the process (so that Kubernetes
/// restarts it), and on shutdown each drains before it ends.
async fn until_all_end(mut components: Components) -> anyhow::Result<()> {
    while let Some(ended) = components.join_next().await {
        ended.context("component panicked")??;
    }
    Ok(())
}

/// The components started so far, each ending with its error (or `Ok` once it has shut down).
type Components = tokio::task::JoinSet<anyhow::Result<()>>;

/// Awaits one start-up step while watching the components already running and the shutdown
/// signal; `None` when shutdown came first. A start-up step may wait long (for an API server that
/// is unreachable, for caches to sync): a component that fails meanwhile must still end the
/// process, and so must SIGTERM.
async fn start_step<T, E>(
    components: &mut Components,
    stopped: impl Future<Output = ()>,
    step: impl Future<Output = Result<T, E>>,
) -> anyhow::Result<Option<T>>
where
    anyhow::Error: From<E>,
{
    tokio::pin!(step, stopped);
    loop {
        tokio::select! {
            done = &mut step => return Ok(Some(done?)),
            () = &mut stopped => {
                info!("shutdown during start-up");
                return Ok(None);
            }
            Some(ended) = components.join_next() => ended.context("component panicked")??,
        }
    }
}

fn main() -> anyhow::Result<()> {
    // Before the runtime's threads and buffers touch any memory.
    disable_transparent_huge_pages();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(cli())
}

async fn cli() -> anyhow::Result<()> {
    // One rustls crypto provider for kube, reqwest and jsonwebtoken.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match Cli::parse().command {
        Command::Crd { kind } => {
            match kind {
                None => print!("{}", all_crds_yaml()),
                Some(CrdKindArg::WebhookEndpoint) => print!("{}", kind_crd_yaml(CrdKind::WebhookEndpoint)),
                Some(CrdKindArg::WebhookEventType) => print!("{}", kind_crd_yaml(CrdKind::WebhookEventType)),
            }
            Ok(())
        }
        Command::Openapi => {
            println!("{}", capy_webhooks::api::openapi::document_text());
            Ok(())
        }
        Command::Run(args) => run(*args).await,
        Command::ApiKey(command) => api_key_command(command).await,
        Command::DeliveryLog(command) => delivery_log_command(command).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_flag_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_flag_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_flag_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert!(parse_flag_duration("soon").is_err());
    }

    #[test]
    fn egress_proxy_is_off_by_default_and_never_repeats_its_url() {
        assert_eq!(run_args(&[]).egress_proxy, None);
        assert_eq!(egress_proxy(None).unwrap(), None);
        let args = run_args(&["--egress-proxy", "http://capy:hunter2@proxy.internal:3128"]);
        let proxy = egress_proxy(args.egress_proxy.as_deref()).unwrap().unwrap();
        assert_eq!(proxy.address(), "proxy.internal:3128");
        let err = egress_proxy(Some("https://capy:hunter2@proxy.internal:3128")).unwrap_err();
        assert!(err.to_string().starts_with("--egress-proxy: "), "{err}");
        assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
    }

    #[test]
    fn strict_event_types_is_off_by_default_and_reaches_ingest() {
        let flags = ["--components", "dispatcher", "--ingest-token-file", "/t"];
        let lenient = setup_of(&flags).dispatcher.unwrap();
        assert!(!lenient.strict_event_types);
        let strict = setup_of(&[&flags[..], &["--strict-event-types"]].concat())
            .dispatcher
            .unwrap();
        assert!(strict.strict_event_types);
    }

    #[test]
    fn crd_prints_every_kind_or_the_one_asked_for() {
        let parse = |argv: &[&str]| match Cli::try_parse_from(argv).expect("parses").command {
            Command::Crd { kind } => kind.map(|k| format!("{k:?}")),
            other => panic!("not crd: {other:?}"),
        };
        assert_eq!(parse(&["capy-webhooks", "crd"]), None);
        assert_eq!(
            parse(&["capy-webhooks", "crd", "--kind", "WebhookEventType"]).as_deref(),
            Some("WebhookEventType")
        );
        assert!(Cli::try_parse_from(["capy-webhooks", "crd", "--kind", "Nope"]).is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// `capy-webhooks run` with these flags, parsed.
    fn run_args(flags: &[&str]) -> RunArgs {
        let argv = ["capy-webhooks", "run"].into_iter().chain(flags.iter().copied());
        match Cli::try_parse_from(argv).expect("the flags parse").command {
            Command::Run(args) => *args,
            other => panic!("not run: {other:?}"),
        }
    }

    fn setup(flags: &[&str], in_cluster: Option<&str>) -> anyhow::Result<Setup> {
        configure(&run_args(flags), in_cluster, &Metrics::new(), &Readiness::new())
    }

    #[test]
    fn defaults_start_every_component() {
        let setup = setup(&["--ingest-token-file", "/token"], None).unwrap();
        assert_eq!(setup.scope, Scope::Namespace("default".into()));
        assert_eq!(setup.home_namespace, "default");
        assert_eq!(setup.server_limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(setup.server_limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(setup.server_limits.max_connections, 1024);

        let controller = setup.controller.expect("the controller runs");
        assert_eq!(controller.rotation_grace_period, Duration::from_secs(24 * 3600));
        assert!(!controller.url_policy.allow_http);

        let dispatcher = setup.dispatcher.expect("the dispatcher runs");
        assert_eq!(dispatcher.token_file, PathBuf::from("/token"));
        assert_eq!(dispatcher.payload_limit, 64 * 1024);
        let config = dispatcher.config;
        assert_eq!(config.schedule, DEFAULT_SCHEDULE.parse::<RetrySchedule>().unwrap());
        assert_eq!(config.log.max_finished, 100);
        assert_eq!(config.per_endpoint_concurrency, 8);
        assert_eq!(config.summary_interval, Duration::from_secs(10));
        assert_eq!(config.auto_disable_after, Duration::from_secs(5 * 86_400));
        assert_eq!(config.payload_retention, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(config.shutdown_grace, Duration::from_secs(20));
        assert_eq!(config.persist_timeout, Duration::from_secs(10));
        assert_eq!(config.sender.connect_timeout, Duration::from_secs(5));
        assert_eq!(config.sender.total_timeout, Duration::from_secs(15));
        assert!(!config.sender.policy.allow_private && !config.sender.policy.allow_metadata);
        assert!(!config.sender.allow_http);
        assert_eq!(config.budget.rate(), 512 * 1024);

        let api = setup.api.expect("the API runs");
        assert!(api.clerk.is_none());
        assert_eq!(api.config.body_limit, 64 * 1024);
        assert_eq!(api.config.max_endpoints_per_organization, 100);
        assert_eq!(api.config.organization_rate_limit, 5.0);
        assert_eq!(api.config.controller_wait, Duration::from_secs(10));
        assert_eq!(api.config.portal_session_ttl, jiff::SignedDuration::from_hours(1));
        assert_eq!(api.config.portal_url, None);
        assert_eq!(api.config.home_namespace, "default");
    }

    #[test]
    fn scope_and_home_namespace() {
        let all = || Scope::AllNamespaces;
        let ns = |n: &str| Scope::Namespace(n.into());
        // (flags, in-cluster namespace) => (scope, home namespace)
        #[allow(clippy::type_complexity)]
        let table: [((&[&str], Option<&str>), (Scope, &str)); 8] = [
            ((&[], None), (ns("default"), "default")),
            ((&[], Some("ops")), (ns("ops"), "ops")),
            ((&["--namespace", "team"], Some("ops")), (ns("team"), "team")),
            (
                (&["--namespace", "team", "--home-namespace", "home"], None),
                (ns("team"), "home"),
            ),
            ((&["--home-namespace", "home"], Some("ops")), (ns("ops"), "home")),
            ((&["--all-namespaces"], Some("ops")), (all(), "ops")),
            ((&["--all-namespaces"], None), (all(), "default")),
            (
                (&["--all-namespaces", "--home-namespace", "home"], Some("ops")),
                (all(), "home"),
            ),
        ];
        for ((flags, in_cluster), (scope, home)) in table {
            let flags: Vec<&str> = flags.iter().copied().chain(["--components", "controller"]).collect();
            let setup = setup(&flags, in_cluster).unwrap();
            assert_eq!(
                (&setup.scope, setup.home_namespace.as_str()),
                (&scope, home),
                "{flags:?} {in_cluster:?}"
            );
            assert_eq!(setup.controller.unwrap().scope, scope);
        }
    }

    #[test]
    fn only_the_components_asked_for_are_configured() {
        let setup = setup_of(&["--components", "api"]);
        assert!(setup.controller.is_none() && setup.dispatcher.is_none());
        assert!(setup.api.is_some());
        let setup = setup_of(&["--components", "controller,dispatcher", "--ingest-token-file", "/t"]);
        assert!(setup.api.is_none() && setup.controller.is_some() && setup.dispatcher.is_some());
    }

    fn setup_of(flags: &[&str]) -> Setup {
        setup(flags, None).unwrap()
    }

    #[test]
    fn operational_webhooks_need_both_flags_and_the_dispatcher() {
        let parse = |flags: &[&str]| {
            let argv = ["capy-webhooks", "run"].into_iter().chain(flags.iter().copied());
            Cli::try_parse_from(argv).map(drop)
        };
        assert!(parse(&["--operational-webhook-url", "https://platform.example.com/hook"]).is_err());
        assert!(parse(&["--operational-webhook-secret-file", "/secret"]).is_err());
        let both = [
            "--operational-webhook-url",
            "https://platform.example.com/hook",
            "--operational-webhook-secret-file",
            "/secret",
        ];
        assert!(parse(&both).is_ok());
        let without_dispatcher: Vec<&str> = both.iter().copied().chain(["--components", "api,controller"]).collect();
        let e = setup(&without_dispatcher, None).err().expect("refused");
        assert!(e.to_string().contains("needs the dispatcher"), "{e}");
        // Off by default: the controller tells nothing, the dispatcher sends nothing.
        let setup = setup_of(&["--ingest-token-file", "/t"]);
        assert!(setup.controller.unwrap().operational.is_none());
        assert!(setup.dispatcher.unwrap().config.operational.is_none());
    }

    #[test]
    fn clerk_sessions_are_configured_from_their_flags() {
        let setup = setup_of(&[
            "--components",
            "api",
            "--clerk-jwks-url",
            "https://clerk.example.com/.well-known/jwks.json",
            "--clerk-issuer",
            "https://clerk.example.com",
            "--clerk-authorized-parties",
            "https://a.example.com,,https://b.example.com",
            "--clerk-required-role",
            "org:admin",
        ]);
        let clerk = setup.api.unwrap().clerk.expect("Clerk sessions");
        assert_eq!(clerk.issuer, "https://clerk.example.com");
        assert_eq!(
            clerk.authorized_parties,
            ["https://a.example.com", "https://b.example.com"]
        );
        assert_eq!(clerk.required_roles, ["org:admin"]);
    }

    #[test]
    fn combinations_that_cannot_run_are_refused_clearly() {
        // (flags) => what the error says
        let table: [(&[&str], &str); 3] = [
            (&[], "the dispatcher needs --ingest-token-file"),
            (
                &["--components", "dispatcher"],
                "the dispatcher needs --ingest-token-file",
            ),
            (
                &[
                    "--components",
                    "api",
                    "--clerk-jwks-url",
                    "http://clerk.example.com/jwks",
                    "--clerk-issuer",
                    "https://clerk.example.com",
                ],
                "--clerk-jwks-url must be an https:// URL",
            ),
        ];
        for (flags, says) in table {
            let Err(error) = setup(flags, None) else {
                panic!("{flags:?} was accepted");
            };
            assert!(error.to_string().contains(says), "{flags:?}: {error}");
        }
        // A plain http:// JWKS is accepted with --allow-http (development).
        let flags = [
            "--components",
            "api",
            "--allow-http",
            "--clerk-jwks-url",
            "http://clerk.example.com/jwks",
            "--clerk-issuer",
            "https://clerk.example.com",
        ];
        assert!(setup(&flags, None).unwrap().api.unwrap().clerk.is_some());
        // Conflicting flags never reach `configure`: the command line is refused.
        let argv = ["capy-webhooks", "run", "--namespace", "a", "--all-namespaces"];
        assert!(Cli::try_parse_from(argv).is_err());
        let argv = ["capy-webhooks", "run", "--clerk-jwks-file", "/jwks"];
        assert!(Cli::try_parse_from(argv).is_err(), "a JWKS needs --clerk-issuer");
    }
}
