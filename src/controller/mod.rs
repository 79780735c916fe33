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

use futures::{Future, FutureExt, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::backoff::retry_delay;
use crate::client_certificate::identity_from_secret;
use crate::endpoints::ControllerFeed;
use crate::operational::{Announced, Emitter, announced_of, deleted_event, endpoint_event};
use crate::resources::{
    CONDITION_CLIENT_CERTIFICATE_READY, CONDITION_READY, CONDITION_SECRET_READY, FIELD_MANAGER, ORGANIZATION_LABEL,
    Scope, WebhookEndpoint, WebhookEndpointStatus, signing_secret_name,
};
use crate::signing::SigningSecret;
use crate::signing_secret::signing_secret_selector;
use crate::telemetry::{EventNote, Metrics, ReadyHandle, WriteKind, publish_event};
use crate::tenancy::NamespaceBinding;
use crate::validation::UrlPolicy;
use desired::{Observed, decide};

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
    /// With operational webhooks on: how endpoint changes are told to the platform.
    pub operational: Option<Emitter>,
}

/// Everything a reconcile needs, shared by all of them.
pub struct Context {
    client: Client,
    recorder: Recorder,
    config: ControllerConfig,
    /// Which namespaces may serve which organizations.
    binding: NamespaceBinding,
    /// The endpoints the controller runs on (to forget the failures of deleted ones).
    store: Store<WebhookEndpoint>,
    /// Consecutive failures per endpoint, for exponential backoff; reset on success and forgotten
    /// when the endpoint is deleted.
    failures: Mutex<HashMap<ObjectRef<WebhookEndpoint>, u32>>,
}

/// Why a reconcile failed. Each variant's name is a metric label and an Event reason.
#[derive(Debug, thiserror::Error, strum::EnumDiscriminants)]
#[strum_discriminants(name(ErrorReason), derive(strum::IntoStaticStr, strum::EnumIter))]
pub enum Error {
    /// The endpoint lacks a namespace, name or uid (only possible for malformed watch data).
    #[error("endpoint has no {0}")]
    MissingMetadata(&'static str),
    /// Reading the signing Secret failed.
    #[error("reading the signing Secret failed: {0}")]
    ReadSecretFailed(#[source] kube::Error),
    /// Writing the signing Secret failed.
    #[error("writing the signing Secret failed: {0}")]
    WriteSecretFailed(#[source] kube::Error),
    /// Setting the organization label failed.
    #[error("labelling the endpoint failed: {0}")]
    WriteLabelFailed(#[source] kube::Error),
    /// Writing the status failed.
    #[error("writing the status failed: {0}")]
    WriteStatusFailed(#[source] kube::Error),
    /// The endpoint's change could not be stored as an operational event (tried again; the
    /// change is told once it is, and its status is written after that).
    #[error("the operational event could not be stored: {0}")]
    OperationalEventNotStored(#[source] crate::work::SubmitError),
}

impl Error {
    /// Every [`Error::reason`], derived from the variants so none is missed.
    pub fn reasons() -> Vec<&'static str> {
        use strum::IntoEnumIterator;
        ErrorReason::iter().map(<&'static str>::from).collect()
    }

    /// A stable, short name: the `reason` label of metrics and the Event reason.
    pub fn reason(&self) -> &'static str {
        ErrorReason::from(self).into()
    }
}

/// Reconciles running at once at most.
pub const RECONCILE_CONCURRENCY: u16 = 16;

impl Context {
    /// A context for reconciles made with `client`.
    pub fn new(
        client: Client,
        config: ControllerConfig,
        binding: NamespaceBinding,
        store: Store<WebhookEndpoint>,
    ) -> Self {
        let reporter = Reporter {
            controller: "capy-webhooks".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            binding,
            store,
            failures: Mutex::default(),
        }
    }

    async fn publish(&self, endpoint: &WebhookEndpoint, note: &EventNote) {
        publish_event(&self.recorder, &self.config.metrics, &endpoint.object_ref(&()), note).await;
    }

    fn wrote(&self, kind: WriteKind) {
        self.config.metrics.apiserver_writes(kind, 1);
    }
}

/// When to reconcile again after the signing Secret changed between its read and its write.
const SECRET_CHANGED_RECHECK: Duration = Duration::from_millis(500);

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
    // Read.
    let namespace = endpoint.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let name = endpoint.name_any();
    let endpoints: Api<WebhookEndpoint> = Api::namespaced(ctx.client.clone(), &namespace);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let existing = secrets
        .get_opt(&signing_secret_name(&name))
        .await
        .map_err(Error::ReadSecretFailed)?;

    // The client certificate the endpoint names, if any: read and judged like the dispatcher does.
    let client_certificate = match &endpoint.spec.client_certificate {
        None => None,
        Some(certificate) => {
            let secret = secrets
                .get_opt(&certificate.secret_name)
                .await
                .map_err(Error::ReadSecretFailed)?;
            Some(identity_from_secret(&certificate.secret_name, secret.as_ref()).map(drop))
        }
    };

    // Validate and build what should be: pure.
    let observed = Observed {
        endpoint,
        secret: existing.as_ref(),
        organization_allowed: ctx.binding.serves(&namespace, &endpoint.spec.organization_id),
        url_policy: ctx.config.url_policy,
        grace: ctx.config.rotation_grace_period,
        now: Timestamp::now(),
        client_certificate,
    };
    let mut decision = decide(&observed, SigningSecret::generate_with).map_err(Error::MissingMetadata)?;

    // Tell the platform of the change (operational webhooks) before the status records it as
    // told: a failure here, or a crash before the status is written, tells it again, under the
    // same derived ids, which the operational log refuses to deliver twice.
    let announced = announced_of(endpoint.status.as_ref(), endpoint.spec.active);
    if let Some(emitter) = &ctx.config.operational
        && let Some(event) = endpoint_event(endpoint, announced, Timestamp::now())
    {
        info!(%namespace, endpoint = %name, event_type = %event.event_type, event = %event.event_id,
            "telling the platform of the endpoint's change");
        emitter.store(event).await.map_err(Error::OperationalEventNotStored)?;
    }
    decision.status.announced = Some(Announced {
        generation: endpoint.metadata.generation.unwrap_or(0),
        active: endpoint.spec.active,
    });
    decision.status_changed = endpoint.status.as_ref() != Some(&decision.status);

    // Apply what differs.
    ensure_organization_label(endpoint, &endpoints, ctx).await?;
    if let Some(secret) = &decision.secret {
        // Conditional on what was read: a controller that just lost its Lease and the new leader
        // may reconcile the same endpoint at once, and a secret once answered to a client must
        // never be overwritten by another one (the loser gets a conflict and reads again).
        let written = match &existing {
            None => {
                let post = PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                };
                secrets.create(&post, secret).await.map(drop)
            }
            Some(current) => {
                let mut secret = secret.clone();
                secret.metadata.resource_version = current.resource_version();
                secrets
                    .patch(
                        &signing_secret_name(&name),
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&secret),
                    )
                    .await
                    .map(drop)
            }
        };
        match written {
            // Someone wrote the Secret since it was read (the REST facade creating the endpoint,
            // or the other side of a leader handover): not a failure, nothing to warn about; the
            // next round reads what is there now.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                debug!(%namespace, endpoint = %name, "the signing Secret changed since it was read; reconciling again");
                return Ok(Action::requeue(SECRET_CHANGED_RECHECK));
            }
            written => written.map_err(Error::WriteSecretFailed)?,
        }
        ctx.wrote(WriteKind::Secret);
    }
    if decision.status_changed {
        write_status(endpoint, &endpoints, &decision.status, ctx).await?;
    }

    // Publish.
    if let Some(event) = decision.event {
        if event.warning {
            warn!(%namespace, endpoint = %name, reason = event.reason, note = %event.note, "endpoint event");
        } else {
            info!(%namespace, endpoint = %name, reason = event.reason, note = %event.note, "endpoint event");
        }
        ctx.publish(endpoint, &event).await;
    }
    Ok(decision.requeue.map_or_else(Action::await_change, Action::requeue))
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
        .map_err(Error::WriteLabelFailed)?;
    ctx.wrote(WriteKind::Endpoint);
    Ok(())
}

/// Writes the controller's part of the status. Only the controller's fields and conditions are
/// applied, so fields other components own under their own field managers are untouched.
async fn write_status(
    endpoint: &WebhookEndpoint,
    endpoints: &Api<WebhookEndpoint>,
    status: &WebhookEndpointStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let conditions: Vec<_> = status
        .conditions
        .iter()
        .filter(|c| {
            c.type_ == CONDITION_READY
                || c.type_ == CONDITION_SECRET_READY
                || c.type_ == CONDITION_CLIENT_CERTIFICATE_READY
        })
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
            "announced": status.announced,
        }
    });
    endpoints
        .patch_status(
            &endpoint.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::WriteStatusFailed)?;
    ctx.wrote(WriteKind::EndpointStatus);
    Ok(())
}

/// Decides the retry after a failed reconcile: per-endpoint exponential backoff, and a Warning
/// Event so the failure shows in `kubectl describe`.
pub fn error_policy(endpoint: Arc<WebhookEndpoint>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = {
        let mut map = ctx.failures.lock().expect("failure map lock");
        // Deleted endpoints are never reconciled again, so their counts go here; failures are
        // rare and the map small.
        map.retain(|key, _| ctx.store.get(key).is_some());
        let n = map.entry(ObjectRef::from(endpoint.as_ref())).or_insert(0);
        *n += 1;
        *n
    };
    let delay = retry_delay(failures);
    warn!(endpoint = %endpoint.name_any(), namespace = ?endpoint.namespace(), reason = error.reason(), %error, failures, ?delay, "reconcile failed");
    let note = EventNote {
        warning: true,
        reason: error.reason(),
        action: "Reconcile",
        note: error.to_string(),
    };
    tokio::spawn(async move {
        ctx.publish(&endpoint, &note).await;
    });
    Action::requeue(delay)
}

/// Changes of endpoints the controller may lag behind while it leads before the relay waits.
const RELAY_BUFFER: usize = 1024;

/// Runs the controller until `shutdown` resolves, reconciling only while `leading` is true (the
/// controller Lease is held; a fixed `true` receiver runs it unconditionally). Each term starts
/// by reconciling every endpoint, and ends, without starting new reconciles, when leadership is
/// lost.
pub async fn run(
    client: Client,
    config: ControllerConfig,
    feed: ControllerFeed,
    leading: watch::Receiver<bool>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    config.metrics.declare_reconcile_error_reasons(&Error::reasons());
    let ControllerFeed {
        trigger,
        store,
        binding,
        deleted,
    } = feed;
    // The cache's change stream is drained at all times (a subscriber that stops reading stalls
    // the cache every component reads) and passed on only while leading.
    // The relay follows a gate of its own (open during terms), so it holds no receiver of the
    // Lease's channel, whose last drop releases the Lease.
    let (relay, relayed) = mpsc::channel::<Arc<WebhookEndpoint>>(RELAY_BUFFER);
    let (gate, gate_open) = watch::channel(false);
    if let Some(emitter) = config.operational.clone() {
        tell_deletions(deleted, gate_open.clone(), emitter);
    }
    tokio::spawn(async move {
        futures::pin_mut!(trigger);
        while let Some(endpoint) = trigger.next().await {
            let open = *gate_open.borrow();
            if open && relay.send(endpoint).await.is_err() {
                break;
            }
        }
    });
    let relayed = Arc::new(tokio::sync::Mutex::new(relayed));
    let ready = config.ready.clone();
    let ready_store = store.clone();
    tokio::spawn(async move {
        if crate::endpoints::store_ready(&ready_store).await.is_ok() {
            ready.set_ready();
        }
    });
    let ctx = Arc::new(Context::new(client.clone(), config, binding.clone(), store.clone()));
    let shutdown = shutdown.shared();
    let mut leading_now = leading.clone();
    loop {
        let became = tokio::select! {
            became = async { leading_now.wait_for(|l| *l).await.is_ok() } => became,
            () = shutdown.clone() => break,
        };
        if !became {
            // Leadership can no longer change, and this replica does not lead.
            shutdown.clone().await;
            break;
        }
        ctx.config.metrics.controller_leader(true);
        gate.send_replace(true);
        info!(scope = ?ctx.config.scope, "controller leading: reconciling every endpoint");
        let (term_leading, term_shutdown) = (leading.clone(), shutdown.clone());
        lead(&client, &ctx, &store, &binding, relayed.clone(), async move {
            tokio::select! {
                () = crate::controller_lease::lost(term_leading) => info!("controller leadership lost"),
                () = term_shutdown => {}
            }
        })
        .await;
        gate.send_replace(false);
        ctx.config.metrics.controller_leader(false);
        if shutdown.clone().now_or_never().is_some() {
            break;
        }
    }
    info!("controller stopped");
    Ok(())
}

/// Tells the platform of every endpoint deleted while this replica leads (`endpoint.deleted`):
/// deletions come from the watch, not from reconciles (an endpoint has no finalizer). Each is
/// stored in the background, tried again until it is (its id is derived from the endpoint's uid,
/// so a replica that took over and tells it too makes no second delivery).
fn tell_deletions(
    mut deleted: tokio::sync::broadcast::Receiver<Arc<WebhookEndpoint>>,
    leading: watch::Receiver<bool>,
    emitter: Emitter,
) {
    use tokio::sync::broadcast::error::RecvError;
    tokio::spawn(async move {
        loop {
            let endpoint = match deleted.recv().await {
                Ok(endpoint) => endpoint,
                Err(RecvError::Lagged(n)) => {
                    warn!(
                        missed = n,
                        "the controller fell behind endpoint deletions: some are not told to the platform"
                    );
                    continue;
                }
                Err(RecvError::Closed) => break,
            };
            if !*leading.borrow() {
                continue;
            }
            let event = deleted_event(&endpoint, Timestamp::now());
            info!(namespace = ?endpoint.metadata.namespace, endpoint = %endpoint.name_any(), event = %event.event_id,
                "telling the platform the endpoint was deleted");
            let (emitter, leading) = (emitter.clone(), leading.clone());
            tokio::spawn(async move {
                // Given up when the term ends: the next leader does not see this deletion.
                emitter.store_retrying(event, move || !*leading.borrow()).await;
            });
        }
    });
}

/// One term of leadership: the controller runs until `term_end`.
async fn lead(
    client: &Client,
    ctx: &Arc<Context>,
    store: &Store<WebhookEndpoint>,
    binding: &NamespaceBinding,
    relayed: Arc<tokio::sync::Mutex<mpsc::Receiver<Arc<WebhookEndpoint>>>>,
    term_end: impl Future<Output = ()> + Send + Sync + 'static,
) {
    // Metadata only: the controller needs to know a Secret changed or vanished, not its data.
    let secrets: Api<PartialObjectMeta<Secret>> = ctx.config.scope.api(client.clone());
    let secret_changes = watcher(secrets, watcher::Config::default().labels(&signing_secret_selector()))
        .default_backoff()
        .touched_objects();
    // Every endpoint at the start of the term, and again when a namespace's organization label
    // changes (it binds or unbinds every endpoint in it).
    let relabelled = futures::stream::unfold(binding.changes(), |mut changes| async move {
        changes.changed().await.ok()?;
        Some(((), changes))
    });
    let reconcile_all = futures::stream::once(async {}).chain(relabelled);
    let changes = futures::stream::unfold(relayed, |relayed| async move {
        let endpoint = relayed.lock().await.recv().await?;
        Some((endpoint, relayed))
    });
    // Bounded concurrency: at start every endpoint is due at once, and thousands of parallel
    // reconciles only queue at the API server while holding their buffers.
    Controller::for_shared_stream(changes, store.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY))
        .owns_stream(secret_changes)
        .reconcile_all_on(reconcile_all)
        .graceful_shutdown_on(term_end)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile did not complete");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_the_variant_names() {
        let io = || kube::Error::Api(Box::new(kube::core::Status::failure("x", "y").with_code(500)));
        assert_eq!(Error::ReadSecretFailed(io()).reason(), "ReadSecretFailed");
        assert_eq!(Error::MissingMetadata("uid").reason(), "MissingMetadata");
        assert_eq!(
            Error::reasons(),
            [
                "MissingMetadata",
                "ReadSecretFailed",
                "WriteSecretFailed",
                "WriteLabelFailed",
                "WriteStatusFailed",
                "OperationalEventNotStored"
            ]
        );
    }
}
