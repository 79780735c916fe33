//! Leadership through `coordination.k8s.io` Leases, with the maintained `kube-lease-manager`
//! crate: Kubernetes itself coordinates the replicas, no protocol of ours.
//!
//! The holder renews its Lease before it expires; when the holder stops renewing (killed), another
//! replica takes the Lease once it expired; a holder that shuts down releases it, so the handover
//! is immediate.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::watch;
use tracing::{info, warn};

/// Field manager of the Leases this operator writes.
pub const FIELD_MANAGER: &str = "capy-webhooks-leases";

/// Name of the Lease the controller's leader holds.
pub const CONTROLLER_LEASE: &str = "capy-webhooks-controller";

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

/// One Lease this replica competes for.
pub struct Leadership {
    name: String,
    identity: String,
    leading: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<Result<LeaseManager, kube_lease_manager::LeaseManagerError>>,
}

impl Leadership {
    /// Starts competing for Lease `name` (created if missing).
    pub async fn compete(client: Client, config: &LeaseConfig, name: &str) -> anyhow::Result<Self> {
        let duration = config.duration.as_secs().max(2);
        let manager = LeaseManagerBuilder::new(client, name)
            .with_namespace(&config.namespace)
            .with_identity(&config.identity)
            .with_duration(duration)
            .with_grace(grace_seconds(config.duration).min(duration - 1))
            .with_field_manager(FIELD_MANAGER)
            .build()
            .await
            .map_err(|e| anyhow::anyhow!("cannot use Lease {}/{name}: {e}", config.namespace))?;
        let (leading, task) = manager.watch().await;
        Ok(Self {
            name: name.to_string(),
            identity: config.identity.clone(),
            leading,
            task,
        })
    }

    /// Whether this replica holds the Lease, as it changes. The Lease is released only once every
    /// clone is dropped and [`Self::release`] is called.
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Releases the Lease (if held) so another replica takes over at once. Call it after the work
    /// the Lease guards has stopped and dropped its [`Self::leading`] receivers.
    pub async fn release(self) {
        let Self {
            name,
            identity,
            leading,
            task,
        } = self;
        drop(leading);
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(_))) => info!(lease = %name, %identity, "Lease released"),
            Ok(Ok(Err(e))) => warn!(lease = %name, error = %e, "releasing the Lease failed; it expires instead"),
            Ok(Err(e)) => warn!(lease = %name, error = %e, "the Lease task failed"),
            Err(_) => warn!(lease = %name, "releasing the Lease timed out; it expires instead"),
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
    fn identities_default_to_the_pod_or_a_unique_host_name() {
        let id = default_identity();
        assert!(!id.is_empty());
        if std::env::var("POD_NAME").is_err() {
            assert_ne!(id, default_identity(), "two processes on one host differ");
        }
    }
}
