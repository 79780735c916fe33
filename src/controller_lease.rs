//! Leadership through `coordination.k8s.io` Leases, with the maintained `kube-lease-manager`
//! crate: Kubernetes itself coordinates the replicas, no protocol of ours.
//!
//! The holder renews its Lease before it expires; when the holder stops renewing (killed), another
//! replica takes the Lease once it expired; a holder that shuts down releases it, so the handover
//! is immediate.
//!
//! Immediate needs one thing the crate does not do: a replica that does not hold the Lease sleeps
//! until the holder's renewal would expire (up to a whole duration) before it looks again, so it
//! would notice a release only then. Each replica therefore also watches its Lease, and when the
//! Lease is released while it does not lead, starts a fresh manager, which reads the Lease at once
//! and takes it.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Field manager of the Leases this operator writes.
pub const FIELD_MANAGER: &str = "capy-webhooks-leases";

/// Name of the Lease the controller's leader holds.
pub const CONTROLLER_LEASE: &str = "capy-webhooks-controller";

/// How long to wait before building the Lease manager again after it failed.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// How a replica takes part in elections.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Leases (the home namespace).
    pub namespace: String,
    /// This replica's name in the Leases' `holderIdentity`.
    pub identity: String,
    /// How long a Lease stays valid without a renewal.
    pub duration: Duration,
}

/// Renew this long before expiry: a third of the duration, at least 1 s.
fn grace_seconds(duration: Duration) -> u64 {
    (duration.as_secs() / 3).max(1)
}

/// Whether a replica that does not lead should look at the Lease now rather than when the holder's
/// renewal would expire: the Lease has no holder, so it was released (or never taken).
fn released(lease: &Lease) -> bool {
    lease
        .spec
        .as_ref()
        .and_then(|spec| spec.holder_identity.as_deref())
        .is_none_or(str::is_empty)
}

/// One Lease this replica competes for.
pub struct Leadership {
    name: String,
    identity: String,
    leading: watch::Receiver<bool>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Leadership {
    /// Starts competing for Lease `name` (created if missing).
    pub async fn compete(client: Client, config: &LeaseConfig, name: &str) -> anyhow::Result<Self> {
        // The first manager is built here so that a Lease that cannot be used (RBAC) is an error
        // at start, not a warning in a loop.
        let manager = build_manager(&client, config, name)
            .await
            .map_err(|e| anyhow::anyhow!("cannot use Lease {}/{name}: {e}", config.namespace))?;
        let (leading_tx, leading) = watch::channel(false);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(supervise(
            client,
            config.clone(),
            name.to_string(),
            manager,
            leading_tx,
            stopped,
        ));
        Ok(Self {
            name: name.to_string(),
            identity: config.identity.clone(),
            leading,
            stop,
            task,
        })
    }

    /// Whether this replica holds the Lease, as it changes.
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Releases the Lease (if held) so another replica takes over at once. Call it after the work
    /// the Lease guards has stopped.
    pub async fn release(self) {
        let Self {
            name,
            identity,
            leading,
            stop,
            task,
        } = self;
        drop(leading);
        let _ = stop.send(());
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(())) => info!(lease = %name, %identity, "stopped competing for the Lease"),
            Ok(Err(e)) => warn!(lease = %name, error = %e, "the Lease task failed"),
            Err(_) => warn!(lease = %name, "releasing the Lease timed out; it expires instead"),
        }
    }
}

/// Tells the receivers only of real changes, so a replaced manager wakes no one.
fn set(leading: &watch::Sender<bool>, leads: bool) {
    leading.send_if_modified(|current| std::mem::replace(current, leads) != leads);
}

async fn build_manager(
    client: &Client,
    config: &LeaseConfig,
    name: &str,
) -> Result<LeaseManager, kube_lease_manager::LeaseManagerError> {
    let duration = config.duration.as_secs().max(2);
    LeaseManagerBuilder::new(client.clone(), name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_duration(duration)
        .with_grace(grace_seconds(config.duration).min(duration - 1))
        .with_field_manager(FIELD_MANAGER)
        .build()
        .await
}

/// Runs one Lease manager at a time, forwards whether it leads, and replaces it when the Lease is
/// released while this replica does not lead (see the module's documentation).
async fn supervise(
    client: Client,
    config: LeaseConfig,
    name: String,
    first: LeaseManager,
    leading_tx: watch::Sender<bool>,
    mut stopped: oneshot::Receiver<()>,
) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    let mut releases = watcher(api, watcher::Config::default().fields(&format!("metadata.name={name}")))
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut next = Some(first);
    loop {
        let manager = match next.take() {
            Some(manager) => manager,
            None => match build_manager(&client, &config, &name).await {
                Ok(manager) => manager,
                Err(e) => {
                    warn!(lease = %name, error = %e, "cannot use the Lease; trying again");
                    tokio::select! {
                        _ = &mut stopped => return,
                        () = tokio::time::sleep(RETRY_AFTER) => continue,
                    }
                }
            },
        };
        let (mut inner, task) = manager.watch().await;
        let stop = loop {
            tokio::select! {
                _ = &mut stopped => break true,
                changed = inner.changed() => match changed {
                    Ok(()) => {
                        let leads = *inner.borrow_and_update();
                        set(&leading_tx, leads);
                    }
                    // The manager gave up (an API error it does not retry): build another.
                    Err(_) => break false,
                },
                Some(event) = releases.next() => match event {
                    Ok(lease) if !*inner.borrow() && released(&lease) => {
                        debug!(lease = %name, "the Lease was released; looking at it now");
                        break false;
                    }
                    Ok(_) => {}
                    Err(e) => debug!(lease = %name, error = %e, "watching the Lease"),
                },
            }
        };
        // Dropping the last receiver makes the manager release the Lease if it holds it, and end.
        drop(inner);
        match task.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(lease = %name, error = %e, "releasing the Lease failed; it expires instead"),
            Err(e) => warn!(lease = %name, error = %e, "the Lease task failed"),
        }
        set(&leading_tx, false);
        if stop {
            return;
        }
    }
}

/// A default identity when none is given: `$POD_NAME`, else the host name with a random suffix
/// (two processes on one host must not share one).
pub fn default_identity() -> String {
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.is_empty()
    {
        return pod;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "capy-webhooks".into());
    format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// Resolves when `leading` turns false. A sender that is gone means leadership never changes
/// (a fixed receiver, as in single-process tests): then it never resolves.
pub async fn lost(mut leading: watch::Receiver<bool>) {
    if leading.wait_for(|l| !*l).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_come_well_before_expiry() {
        assert_eq!(grace_seconds(Duration::from_secs(15)), 5);
        assert_eq!(grace_seconds(Duration::from_secs(2)), 1);
        assert_eq!(grace_seconds(Duration::from_secs(60)), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn lost_resolves_only_on_a_change_to_false() {
        let (tx, rx) = watch::channel(true);
        let waiting = tokio::spawn(lost(rx));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished());
        tx.send(false).unwrap();
        waiting.await.unwrap();
        // A fixed "leading" (sender gone) never loses.
        let fixed = watch::channel(true).1;
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), lost(fixed))
                .await
                .is_err()
        );
    }

    #[test]
    fn a_lease_without_a_holder_is_released() {
        use k8s_openapi::api::coordination::v1::LeaseSpec;
        let lease = |holder: Option<&str>| Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(String::from),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        };
        assert!(released(&lease(None)));
        assert!(released(&lease(Some(""))));
        assert!(released(&Lease::default()));
        assert!(!released(&lease(Some("capy-webhooks-0"))));
    }

    #[test]
    fn identities_default_to_the_pod_or_a_unique_host_name() {
        let id = default_identity();
        assert!(!id.is_empty());
        if std::env::var("POD_NAME").is_err() {
            assert_ne!(id, default_identity(), "two processes on one host differ");
        }
    }
}
