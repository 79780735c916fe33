//! The `capy-webhooks` binary: parses the command line and starts components.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::sync::watch;
use tracing::info;

use capy_webhooks::controller::{self, ControllerConfig};
use capy_webhooks::resources::{Scope, crd_yaml};
use capy_webhooks::telemetry::{self, LogFormat};
use capy_webhooks::validation::UrlPolicy;

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
    Run(RunArgs),
    /// Print the WebhookEndpoint CRD as YAML (what `crds/` holds).
    Crd,
}

/// A component `run` can start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Component {
    /// Reconciles WebhookEndpoints and owns their signing Secrets.
    Controller,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Components to start, comma separated.
    #[arg(
        long,
        env = "CAPY_WEBHOOKS_COMPONENTS",
        value_delimiter = ',',
        default_value = "controller"
    )]
    components: Vec<Component>,

    /// Namespace to serve (default: the in-cluster namespace, else `default`).
    #[arg(long, env = "CAPY_WEBHOOKS_NAMESPACE", conflicts_with = "all_namespaces")]
    namespace: Option<String>,

    /// Serve every namespace (needs the chart's ClusterRole).
    #[arg(long, env = "CAPY_WEBHOOKS_ALL_NAMESPACES")]
    all_namespaces: bool,

    /// How long a rotated-out signing secret keeps co-signing deliveries (e.g. 24h, 30m).
    #[arg(long, env = "CAPY_WEBHOOKS_ROTATION_GRACE_PERIOD", default_value = "24h", value_parser = parse_duration)]
    rotation_grace_period: Duration,

    /// Accept plain http:// endpoint URLs (development only).
    #[arg(long, env = "CAPY_WEBHOOKS_ALLOW_HTTP")]
    allow_http: bool,

    /// Log line format.
    #[arg(long, env = "CAPY_WEBHOOKS_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let span: jiff::SignedDuration = s
        .parse::<jiff::Span>()
        .map_err(|e| format!("{s:?} is not a duration like 30s, 5m or 24h: {e}"))
        .and_then(|span| {
            span.to_duration(jiff::SpanRelativeTo::days_are_24_hours())
                .map_err(|e| format!("{s:?} is not a fixed-length duration: {e}"))
        })?;
    Duration::try_from(span).map_err(|_| format!("{s:?} must not be negative"))
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

async fn run(args: RunArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format);
    let scope = if args.all_namespaces {
        Scope::AllNamespaces
    } else {
        Scope::Namespace(
            args.namespace
                .or_else(in_cluster_namespace)
                .unwrap_or_else(|| "default".into()),
        )
    };
    let client = kube::Client::try_default()
        .await
        .context("cannot build a Kubernetes client from the kubeconfig or in-cluster settings")?;
    info!(version = env!("CARGO_PKG_VERSION"), components = ?args.components, ?scope, "capy-webhooks starting");

    // One shutdown signal fans out to every component.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown requested");
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let mut tasks = tokio::task::JoinSet::new();
    for component in &args.components {
        match component {
            Component::Controller => {
                let config = ControllerConfig {
                    scope: scope.clone(),
                    rotation_grace_period: args.rotation_grace_period,
                    url_policy: UrlPolicy {
                        allow_http: args.allow_http,
                    },
                };
                tasks.spawn(controller::run(client.clone(), config, stopped()));
            }
        }
    }
    // A component that fails ends the process, so that Kubernetes restarts it.
    while let Some(result) = tasks.join_next().await {
        result.context("component panicked")??;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One rustls crypto provider for kube, reqwest and jsonwebtoken.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", crd_yaml());
            Ok(())
        }
        Command::Run(args) => run(args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
