//! The WebhookEndpoint controller: keeps each endpoint's organization label, signing Secret and
//! status true.
//!
//! Reconcile is a pipeline: read (the endpoint from the watch, its Secret with one GET), validate,
//! build the desired Secret and status with the pure functions of [`desired`], apply what differs
//! with server-side apply under one field manager, then record Events. Only the first and last
//! steps touch the client.

pub mod desired;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Future, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::backoff::retry_delay;
use crate::endpoints::ControllerFeed;
use crate::resources::{
    CONDITION_READY, CONDITION_SECRET_READY, FIELD_MANAGER, ORGANIZATION_LABEL, Scope, WebhookEndpoint,
    WebhookEndpointStatus, signing_secret_name,
};
use crate::signing::{KeyRingChange, SigningSecret, StoredKeyRing, plan_key_ring};
use crate::signing_secret::{signing_secret_selector, stored_key_ring};
use crate::telemetry::{Metrics, ReadyHandle, WriteKind};
use crate::validation::{UrlPolicy, validate_spec};
use desired::{Outcome, Owner, desired_secret, desired_status, secret_matches};

/// Settings of the controller.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Namespaces served.
    pub scope: Scope,
    /// How long a rotated-out secret keeps co-signing.
    pub rotation_grace_period: Duration,
    /// Which URLs count as valid.
    pub url_policy: UrlPolicy,
    /// Where reconciles and API-server writes are counted.
    pub metrics: Metrics,
    /// Flipped once the controller runs and its first list of endpoints is in.
    pub ready: ReadyHandle,
}

/// Everything a reconcile needs, shared by all of them.
pub struct Context {
    client: Client,
    recorder: Recorder,
    config: ControllerConfig,
    /// Consecutive failures per endpoint, for exponential backoff; reset on success.
    failures: Mutex<HashMap<ObjectRef<WebhookEndpoint>, u32>>,
}

/// Why a reconcile failed. Each variant is a metric label and an Event reason.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint lacks a namespace or uid (only possible for malformed watch data).
    #[error("endpoint has no {0}")]
    MissingMetadata(&'static str),
    /// Reading the signing Secret failed.
    #[error("reading the signing Secret failed: {0}")]
    ReadSecret(#[source] kube::Error),
    /// Writing the signing Secret failed.
    #[error("writing the signing Secret failed: {0}")]
    WriteSecret(#[source] kube::Error),
    /// Setting the organization label failed.
    #[error("labelling the endpoint failed: {0}")]
    WriteLabel(#[source] kube::Error),
    /// Writing the status failed.
    #[error("writing the status failed: {0}")]
    WriteStatus(#[source] kube::Error),
}

impl Error {
    /// Every [`Error::reason`].
    pub const REASONS: [&'static str; 5] = [
        "MissingMetadata",
        "ReadSecretFailed",
        "WriteSecretFailed",
        "WriteLabelFailed",
        "WriteStatusFailed",
    ];

    /// A stable, short name: the `reason` label of metrics and the Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::MissingMetadata(_) => "MissingMetadata",
            Error::ReadSecret(_) => "ReadSecretFailed",
            Error::WriteSecret(_) => "WriteSecretFailed",
            Error::WriteLabel(_) => "WriteLabelFailed",
            Error::WriteStatus(_) => "WriteStatusFailed",
        }
    }
}

/// Reconciles running at once at most.
pub const RECONCILE_CONCURRENCY: u16 = 16;

impl Context {
    /// A context for reconciles made with `client`.
    pub fn new(client: Client, config: ControllerConfig) -> Self {
        let reporter = Reporter {
            controller: "capy-webhooks".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            failures: Mutex::default(),
        }
    }

    async fn publish(&self, endpoint: &WebhookEndpoint, type_: EventType, reason: &str, action: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        match self.recorder.publish(&event, &endpoint.object_ref(&())).await {
            Ok(()) => self.wrote(WriteKind::Event),
            Err(e) => warn!(endpoint = %endpoint.name_any(), error = %e, "could not publish Event"),
        }
    }

    fn wrote(&self, kind: WriteKind) {
        self.config.metrics.apiserver_writes(kind, 1);
    }
}

/// Reconciles one endpoint.
pub async fn reconcile(endpoint: Arc<WebhookEndpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile_inner(&endpoint, &ctx).await;
    ctx.config
        .metrics
        .reconciled(started.elapsed(), result.as_ref().err().map(Error::reason));
    if result.is_ok() {
        ctx.failures
            .lock()
            .expect("failure map lock")
            .remove(&ObjectRef::from(endpoint.as_ref()));
    }
    result
}

async fn reconcile_inner(endpoint: &WebhookEndpoint, ctx: &Context) -> Result<Action, Error> {
    let namespace = endpoint.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let name = endpoint.name_any();
    let now = Timestamp::now();
    let endpoints: Api<WebhookEndpoint> = Api::namespaced(ctx.client.clone(), &namespace);

    ensure_organization_label(endpoint, &endpoints, ctx).await?;

    if let Err(reason) = validate_spec(&endpoint.spec, ctx.config.url_policy) {
        let status = desired_status(
            endpoint.status.as_ref(),
            endpoint.metadata.generation,
            &Outcome::InvalidSpec(reason.clone()),
            now,
        );
        if write_status(endpoint, &endpoints, &status, ctx).await? {
            ctx.publish(endpoint, EventType::Warning, "InvalidSpec", "Validate", reason)
                .await;
        }
        return Ok(Action::await_change());
    }

    let secret_name = signing_secret_name(&name);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let existing = secrets.get_opt(&secret_name).await.map_err(Error::ReadSecret)?;
    let owner_ref = endpoint
        .controller_owner_ref(&())
        .ok_or(Error::MissingMetadata("uid"))?;
    // A Secret controlled by another object (say, a deleted endpoint of the same name that the
    // garbage collector has not reached yet) must not hand its secret to this endpoint.
    let foreign = existing.as_ref().is_some_and(|s| {
        s.metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true) && o.uid != owner_ref.uid)
    });
    let stored = if foreign {
        StoredKeyRing::Missing
    } else {
        stored_key_ring(existing.as_ref())
    };
    let existed_before = endpoint.status.as_ref().is_some_and(|s| s.secret_name.is_some());
    let plan = plan_key_ring(
        stored,
        existed_before,
        endpoint.spec.secret_rotation,
        now,
        ctx.config.rotation_grace_period,
        SigningSecret::generate,
    );
    let owner = Owner {
        name: &name,
        namespace: &namespace,
        organization_id: &endpoint.spec.organization_id,
        owner_ref,
    };
    let desired = desired_secret(&owner, &secret_name, &plan.ring);
    if existing.as_ref().is_none_or(|e| !secret_matches(e, &desired)) {
        secrets
            .patch(
                &secret_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await
            .map_err(Error::WriteSecret)?;
        ctx.wrote(WriteKind::Secret);
    }

    let outcome = Outcome::Ready {
        secret_name: secret_name.clone(),
        rotation: plan.ring.rotation,
    };
    let status = desired_status(endpoint.status.as_ref(), endpoint.metadata.generation, &outcome, now);
    write_status(endpoint, &endpoints, &status, ctx).await?;

    match &plan.change {
        KeyRingChange::Unchanged | KeyRingChange::Pruned => {}
        KeyRingChange::Created => {
            info!(%namespace, endpoint = %name, "signing secret created");
            let note = format!("created signing secret in Secret {secret_name}");
            ctx.publish(endpoint, EventType::Normal, "SecretCreated", "CreateSecret", note)
                .await;
        }
        KeyRingChange::Rotated => {
            info!(%namespace, endpoint = %name, rotation = plan.ring.rotation, "signing secret rotated");
            let grace =
                jiff::SignedDuration::try_from(ctx.config.rotation_grace_period).unwrap_or(jiff::SignedDuration::MAX);
            let note = format!(
                "rotated signing secret (rotation {}); the previous secret co-signs for {grace:#}",
                plan.ring.rotation
            );
            ctx.publish(endpoint, EventType::Normal, "SecretRotated", "RotateSecret", note)
                .await;
        }
        KeyRingChange::Repaired { reason } => {
            warn!(%namespace, endpoint = %name, %reason, "signing secret repaired");
            let note = format!("generated a new signing secret in Secret {secret_name}: {reason}");
            ctx.publish(endpoint, EventType::Warning, "SecretRepaired", "RepairSecret", note)
                .await;
        }
    }

    // Wake up when the oldest co-signing secret expires, to prune it; otherwise only changes
    // (of the endpoint or of its Secret) trigger a reconcile.
    Ok(match plan.ring.next_expiry() {
        Some(expiry) => {
            let wait = now.duration_until(expiry).unsigned_abs() + Duration::from_secs(1);
            Action::requeue(wait)
        }
        None => Action::await_change(),
    })
}

async fn ensure_organization_label(
    endpoint: &WebhookEndpoint,
    endpoints: &Api<WebhookEndpoint>,
    ctx: &Context,
) -> Result<(), Error> {
    let org = &endpoint.spec.organization_id;
    if endpoint.labels().get(ORGANIZATION_LABEL) == Some(org) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": WebhookEndpoint::api_version(&()),
        "kind": WebhookEndpoint::kind(&()),
        "metadata": { "labels": { ORGANIZATION_LABEL: org } },
    });
    endpoints
        .patch(
            &endpoint.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::WriteLabel)?;
    ctx.wrote(WriteKind::Endpoint);
    Ok(())
}

/// Writes the controller's part of the status if it differs from the stored one; returns whether
/// it wrote. Only the controller's fields and conditions are applied, so fields other components
/// own under their own field managers are untouched.
async fn write_status(
    endpoint: &WebhookEndpoint,
    endpoints: &Api<WebhookEndpoint>,
    status: &WebhookEndpointStatus,
    ctx: &Context,
) -> Result<bool, Error> {
    if endpoint.status.as_ref() == Some(status) {
        return Ok(false);
    }
    let conditions: Vec<_> = status
        .conditions
        .iter()
        .filter(|c| c.type_ == CONDITION_READY || c.type_ == CONDITION_SECRET_READY)
        .collect();
    let patch = json!({
        "apiVersion": WebhookEndpoint::api_version(&()),
        "kind": WebhookEndpoint::kind(&()),
        "status": {
            "observedGeneration": status.observed_generation,
            "conditions": conditions,
            "secretName": status.secret_name,
            "secretRotation": status.secret_rotation,
            "updatedAt": status.updated_at,
        }
    });
    endpoints
        .patch_status(
            &endpoint.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::WriteStatus)?;
    ctx.wrote(WriteKind::EndpointStatus);
    Ok(true)
}

/// Decides the retry after a failed reconcile: per-endpoint exponential backoff, and a Warning
/// Event so the failure shows in `kubectl describe`.
pub fn error_policy(endpoint: Arc<WebhookEndpoint>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = {
        let mut map = ctx.failures.lock().expect("failure map lock");
        let n = map.entry(ObjectRef::from(endpoint.as_ref())).or_insert(0);
        *n += 1;
        *n
    };
    let delay = retry_delay(failures);
    warn!(endpoint = %endpoint.name_any(), namespace = ?endpoint.namespace(), reason = error.reason(), %error, failures, ?delay, "reconcile failed");
    let (reason, note) = (error.reason(), error.to_string());
    tokio::spawn(async move {
        ctx.publish(&endpoint, EventType::Warning, reason, "Reconcile", note)
            .await;
    });
    Action::requeue(delay)
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: ControllerConfig,
    feed: ControllerFeed,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    // Metadata only: the controller needs to know a Secret changed or vanished, not its data.
    let secrets: Api<PartialObjectMeta<Secret>> = config.scope.api(client.clone());
    let secret_changes = watcher(secrets, watcher::Config::default().labels(&signing_secret_selector()))
        .default_backoff()
        .touched_objects();
    config.metrics.declare_reconcile_error_reasons(&Error::REASONS);
    let ctx = Arc::new(Context::new(client, config));
    info!(scope = ?ctx.config.scope, "controller starting");
    // Bounded concurrency: at start every endpoint is due at once, and thousands of parallel
    // reconciles only queue at the API server while holding their buffers.
    let ControllerFeed { trigger, store } = feed;
    let controller = Controller::for_shared_stream(trigger, store.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY));
    let ready = ctx.config.ready.clone();
    tokio::spawn(async move {
        if crate::endpoints::store_ready(&store).await.is_ok() {
            ready.set_ready();
        }
    });
    controller
        .owns_stream(secret_changes)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile did not complete");
            }
        })
        .await;
    info!("controller stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_declared() {
        let io = || kube::Error::Api(Box::new(kube::core::Status::failure("x", "y").with_code(500)));
        for error in [
            Error::MissingMetadata("uid"),
            Error::ReadSecret(io()),
            Error::WriteSecret(io()),
            Error::WriteLabel(io()),
            Error::WriteStatus(io()),
        ] {
            assert!(Error::REASONS.contains(&error.reason()), "{}", error.reason());
        }
    }
}
