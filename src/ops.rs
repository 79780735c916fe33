//! The operations port (`--metrics-listen`): `/healthz`, `/readyz` and `/metrics`.
//!
//! It starts before anything else, so probes get answers during start-up: `/healthz` is 200
//! while the process runs; `/readyz` is 503 until every started component reported ready.

use std::convert::Infallible;

use futures::Future;
use serde_json::json;
use tracing::info;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::telemetry::{Metrics, OPENMETRICS_CONTENT_TYPE, Readiness};

/// The answer of `/readyz`: 200 when every registered component is ready, else 503; the JSON
/// body names each component and whether it is ready.
pub fn readyz(readiness: &Readiness) -> Response {
    let components = readiness.snapshot();
    let not_ready = readiness.not_ready();
    let ready = not_ready.is_empty();
    let mut body = json!({ "ready": ready, "not_ready": not_ready, "components": components });
    for (name, value) in readiness.details() {
        body[name] = value;
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

/// The routes of the operations port.
pub fn routes(
    metrics: Metrics,
    readiness: Readiness,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let healthz = warp::path!("healthz")
        .and(warp::get().or(warp::head()).unify())
        .map(|| warp::reply::with_header("ok", "content-type", "text/plain; charset=utf-8").into_response());
    let readiness_for_metrics = readiness.clone();
    let readyz = warp::path!("readyz")
        .and(warp::get().or(warp::head()).unify())
        .map(move || readyz(&readiness));
    let metrics = warp::path!("metrics")
        .and(warp::get().or(warp::head()).unify())
        .map(move || {
            metrics.ready(readiness_for_metrics.not_ready().is_empty());
            warp::reply::with_header(metrics.encode(), "content-type", OPENMETRICS_CONTENT_TYPE).into_response()
        });
    healthz
        .or(readyz)
        .unify()
        .or(metrics)
        .unify()
        .recover(crate::http::recover)
        .unify()
}

/// Serves the operations port on `listener` until `shutdown` resolves.
pub async fn run(
    metrics: Metrics,
    readiness: Readiness,
    listener: tokio::net::TcpListener,
    limits: crate::http::ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    info!(listen = %listener.local_addr()?, "operations port serving /healthz /readyz /metrics");
    crate::http::serve(listener, routes(metrics, readiness), shutdown, limits).await;
    info!("operations port stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probes_follow_readiness() {
        let metrics = Metrics::new();
        let readiness = Readiness::new();
        let api = readiness.register("api");
        let _dispatcher = readiness.register("dispatcher");
        let routes = routes(metrics.clone(), readiness.clone());

        let res = warp::test::request().path("/healthz").reply(&routes).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.body().as_ref(), b"ok");

        let res = warp::test::request().path("/readyz").reply(&routes).await;
        assert_eq!(res.status(), 503);
        let res = warp::test::request().path("/metrics").reply(&routes).await;
        let text = std::str::from_utf8(res.body()).unwrap();
        assert!(text.contains("\ncapy_webhooks_ready 0\n"), "{text}");
        let res = warp::test::request().path("/readyz").reply(&routes).await;
        let body: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(body["not_ready"], json!(["api", "dispatcher"]));
        api.set_ready();
        let res = warp::test::request().path("/readyz").reply(&routes).await;
        let body: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(body["not_ready"], json!(["dispatcher"]));
        assert_eq!(body["components"]["api"], true);
        _dispatcher.set_ready();
        let res = warp::test::request().path("/readyz").reply(&routes).await;
        assert_eq!(res.status(), 200);

        let res = warp::test::request().path("/metrics").reply(&routes).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], OPENMETRICS_CONTENT_TYPE);
        let text = std::str::from_utf8(res.body()).unwrap();
        assert!(text.contains("# TYPE capy_webhooks_reconciles counter"), "{text}");
        assert!(text.contains("\ncapy_webhooks_ready 1\n"), "{text}");
        assert!(text.ends_with("# EOF\n"));

        let res = warp::test::request().path("/nope").reply(&routes).await;
        assert_eq!(res.status(), 404);
    }
}
