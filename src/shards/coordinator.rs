//! The IO edge of shard ownership: this replica's membership Lease and the shard Leases it holds,
//! renewed, taken and handed over as [`super::plan`] decides. Everything it knows of the other
//! replicas comes from one watch on the dispatch Leases; it writes only its own Leases, each write
//! conditional on the `resourceVersion` it read (so two replicas never both win one Lease).
//!
//! Expiry is judged by this replica's clock: a Lease is expired once it went unchanged for its
//! whole `leaseDurationSeconds` since this replica saw it change, so clocks of different machines
//! never need to agree. A holder's [`Fence`] closes a margin before that.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use kube::api::PostParams;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::{
    ADDRESS_ANNOTATION, Fence, LEASE_ROLE_LABEL, LeaseView, Location, Placement, SHARD_COUNT, ShardEvent, ShardFeed,
    ShardLeaseView, plan, replica_lease_name, shard_lease_name, unowned,
};
use crate::resources::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::telemetry::{Metrics, Readiness};

/// Field manager of the dispatch Leases.
const FIELD_MANAGER: &str = "capy-webhooks-shards";

/// How often the Leases are looked at when nothing changed (expiries, due renewals).
const TICK: Duration = Duration::from_millis(500);

/// Settings of shard ownership.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Namespace of the Leases (the home namespace).
    pub namespace: String,
    /// This replica's `holderIdentity`.
    pub identity: String,
    /// `host:port` at which the other replicas reach this one's internal port.
    pub address: String,
    /// How long a Lease stays valid without a renewal.
    pub duration: Duration,
    /// How long a shard's work may take to stop when it is handed over.
    pub drain_timeout: Duration,
    /// Where held shards and handovers are counted.
    pub metrics: Metrics,
    /// Where `/readyz` shows the shards held.
    pub readiness: Readiness,
}

/// Renewals come this often: a third of the duration.
fn renew_interval(duration: Duration) -> Duration {
    (duration / 3).max(Duration::from_millis(500))
}

/// A holder stops writing this long before its Lease could expire in anyone's eyes.
fn fence_margin(duration: Duration) -> Duration {
    (duration / 4).max(Duration::from_secs(1))
}

/// A shard Lease this replica holds.
struct Held {
    /// Which hold of the shard this is: a hand-over that ends late never ends a later hold.
    generation: u64,
    fence: Fence,
    lease: Lease,
    renewed_at: Instant,
}

/// Starts competing for shards; the returned feed tells the dispatcher what it holds. On
/// `stopping`, every shard is handed over (its work drained first) and the Leases are released.
pub async fn start(
    client: Client,
    config: CoordinatorConfig,
    stopping: watch::Receiver<bool>,
) -> anyhow::Result<(ShardFeed, tokio::task::JoinHandle<()>)> {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let (store, writer) = reflector::store();
    let changed = Arc::new(Notify::new());
    let stream = reflector::reflector(
        writer,
        watcher(api.clone(), watcher::Config::default().labels(LEASE_ROLE_LABEL)).default_backoff(),
    );
    {
        let changed = changed.clone();
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) => changed.notify_one(),
                    Err(e) => warn!(error = %e, "watching the dispatch Leases failed; retrying"),
                }
            }
        });
    }
    store
        .wait_until_ready()
        .await
        .map_err(|e| anyhow::anyhow!("the dispatch Lease cache never synced: {e}"))?;
    let placement = Placement::new();
    let (events_tx, events) = mpsc::unbounded_channel();
    let (released_tx, released_rx) = mpsc::unbounded_channel::<Released>();
    info!(identity = %config.identity, address = %config.address, shards = SHARD_COUNT,
        "competing for dispatch shards");
    let mut coordinator = Coordinator {
        api,
        store,
        config,
        observed: HashMap::new(),
        held: BTreeMap::new(),
        releasing: BTreeSet::new(),
        member: None,
        member_renewed_at: None,
        placement: placement.clone(),
        events: events_tx,
        released_tx,
        generations: 0,
        stopping: false,
    };
    // The first round runs before this returns: what is free is taken now, so a dispatcher
    // started on this feed reads those logs back before it serves (one process alone holds
    // every shard from its first request on).
    coordinator.step().await;
    let task = tokio::spawn(coordinator.run(changed, released_rx, stopping));
    Ok((ShardFeed { events, placement }, task))
}

struct Coordinator {
    api: Api<Lease>,
    store: Store<Lease>,
    config: CoordinatorConfig,
    /// Each Lease's `resourceVersion` and when this replica first saw it.
    observed: HashMap<String, (String, Instant)>,
    held: BTreeMap<u32, Held>,
    releasing: BTreeSet<u32>,
    member: Option<Lease>,
    member_renewed_at: Option<Instant>,
    placement: Placement,
    events: mpsc::UnboundedSender<ShardEvent>,
    released_tx: mpsc::UnboundedSender<Released>,
    /// Counts holds, for [`Held::generation`].
    generations: u64,
    stopping: bool,
}

impl Coordinator {
    async fn run(
        mut self,
        changed: Arc<Notify>,
        mut released: mpsc::UnboundedReceiver<Released>,
        mut stopping: watch::Receiver<bool>,
    ) {
        let mut shutdown_deadline = None;
        loop {
            if !self.stopping && *stopping.borrow() {
                info!(shards = ?self.held.keys().collect::<Vec<_>>(), "handing every shard over before exit");
                self.stopping = true;
                shutdown_deadline = Some(Instant::now() + self.config.drain_timeout + Duration::from_secs(5));
                self.leave().await;
            }
            self.step().await;
            if self.stopping && (self.held.is_empty() || shutdown_deadline.is_some_and(|d| Instant::now() > d)) {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = changed.notified() => {}
                Some(done) = released.recv() => self.released(done).await,
                _ = stopping.changed(), if !self.stopping => {}
            }
        }
        // Shards still held at the deadline did not drain: their Leases expire rather than being
        // released, so nobody starts while their writes may still land.
        for (shard, generation) in self.held.iter().map(|(s, h)| (*s, h.generation)).collect::<Vec<_>>() {
            self.released(Released {
                shard,
                generation,
                drained: false,
            })
            .await;
        }
        info!("dispatch shards released");
    }

    fn lease(&self, name: &str) -> Option<Arc<Lease>> {
        self.store
            .get(&reflector::ObjectRef::new(name).within(&self.config.namespace))
    }

    /// Whether a Lease went a whole duration unchanged in this replica's eyes.
    fn expired(&self, lease: &Lease) -> bool {
        let spec = lease.spec.clone().unwrap_or_default();
        let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
        match self.observed.get(&lease.name_any()) {
            // Only the version this replica watched for a whole duration counts.
            Some((rv, at)) if Some(rv) == lease.resource_version().as_ref() => at.elapsed() > duration,
            _ => false,
        }
    }

    fn observe(&mut self) {
        let now = Instant::now();
        let mut seen = HashMap::new();
        for lease in self.store.state() {
            let name = lease.name_any();
            let rv = lease.resource_version().unwrap_or_default();
            let at = match self.observed.get(&name) {
                Some((old, at)) if *old == rv => *at,
                _ => now,
            };
            seen.insert(name, (rv, at));
        }
        self.observed = seen;
    }

    /// The live replicas and their addresses.
    fn members(&self) -> BTreeMap<String, String> {
        self.store
            .state()
            .iter()
            .filter(|l| !self.expired(l) && recently_renewed(l, Timestamp::now()))
            .filter_map(|l| membership(l))
            .collect()
    }

    async fn step(&mut self) {
        self.observe();
        if !self.stopping {
            self.renew_membership().await;
        }
        self.renew_held().await;
        let members = self.members();
        self.update_placement(&members);
        if self.stopping {
            let all: Vec<u32> = self.held.keys().copied().collect();
            for shard in all {
                self.release(shard);
            }
        } else {
            let view = LeaseView {
                me: self.config.identity.clone(),
                members: members.keys().cloned().collect(),
                shards: (0..SHARD_COUNT)
                    .map(|s| match self.lease(&shard_lease_name(s)) {
                        Some(l) => ShardLeaseView {
                            holder: l.spec.as_ref().and_then(|s| s.holder_identity.clone()),
                            expired: self.expired(&l),
                        },
                        None => ShardLeaseView::default(),
                    })
                    .collect(),
                held: self.held.keys().copied().collect(),
                releasing: self.releasing.clone(),
            };
            let plan = plan(&view);
            for shard in plan.release {
                self.release(shard);
            }
            let mut acquired = Vec::new();
            for shard in plan.acquire {
                if let Some(fence) = self.acquire(shard).await {
                    acquired.push((shard, fence));
                }
            }
            if !acquired.is_empty() {
                let _ = self.events.send(ShardEvent::Acquired(acquired));
            }
            let held: BTreeSet<u32> = self.held.keys().copied().collect();
            self.config.metrics.shards_unowned(unowned(&view.shards, &held));
        }
        let held: Vec<u32> = self.held.keys().copied().collect();
        self.config.metrics.owned_shards(held.len());
        self.config.readiness.set_detail("shards", json!(held));
    }

    fn new_lease(&self, name: &str, role: &str) -> Lease {
        let mut labels = BTreeMap::new();
        labels.insert(LEASE_ROLE_LABEL.to_string(), role.to_string());
        labels.insert(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string());
        Lease {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(self.config.namespace.clone()),
                labels: Some(labels),
                ..Default::default()
            },
            spec: Some(LeaseSpec::default()),
        }
    }

    fn duration_seconds(&self) -> i32 {
        self.config.duration.as_secs().clamp(1, i32::MAX as u64) as i32
    }

    async fn write(&self, lease: &Lease) -> Result<Lease, kube::Error> {
        let post = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let name = lease.name_any();
        let write = async {
            if lease.resource_version().is_some() {
                self.api.replace(&name, &post, lease).await
            } else {
                self.api.create(&post, lease).await
            }
        };
        // One slow call must not hold up the renewals of every other Lease.
        tokio::time::timeout(renew_interval(self.config.duration), write)
            .await
            .unwrap_or_else(|_| Err(kube::Error::Service("the Lease write timed out".into())))
    }

    /// Creates or renews this replica's membership Lease, which carries its address. In a pod,
    /// the pod owns it, so it goes with the pod.
    async fn renew_membership(&mut self) {
        let interval = renew_interval(self.config.duration);
        if self.member_renewed_at.is_some_and(|at| at.elapsed() < interval) {
            return;
        }
        let name = replica_lease_name(&self.config.identity);
        let mut lease = match self.member.clone().or_else(|| self.lease(&name).map(|l| (*l).clone())) {
            Some(lease) => lease,
            None => {
                let mut lease = self.new_lease(&name, "replica");
                lease.metadata.owner_references = pod_owner();
                lease
            }
        };
        lease
            .annotations_mut()
            .insert(ADDRESS_ANNOTATION.into(), self.config.address.clone());
        let spec = lease.spec.get_or_insert_with(Default::default);
        let now = MicroTime(Timestamp::now());
        if spec.holder_identity.as_deref() != Some(&self.config.identity) {
            spec.acquire_time = Some(now.clone());
        }
        spec.holder_identity = Some(self.config.identity.clone());
        spec.lease_duration_seconds = Some(self.duration_seconds());
        spec.renew_time = Some(now);
        let sent = Instant::now();
        match self.write(&lease).await {
            Ok(written) => {
                self.member = Some(written);
                self.member_renewed_at = Some(sent);
            }
            Err(e) => {
                debug!(error = %e, "renewing the membership Lease failed; re-reading it");
                self.member = None;
            }
        }
    }

    /// Ends membership: the other replicas stop counting this one at once.
    async fn leave(&mut self) {
        if let Some(mut lease) = self.member.take() {
            if let Some(spec) = lease.spec.as_mut() {
                spec.holder_identity = None;
            }
            if let Err(e) = self.write(&lease).await {
                warn!(error = %e, "releasing the membership Lease failed; it expires instead");
            }
        }
    }

    async fn renew_held(&mut self) {
        let interval = renew_interval(self.config.duration);
        let margin = fence_margin(self.config.duration);
        let due: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, h)| h.renewed_at.elapsed() >= interval)
            .map(|(s, _)| *s)
            .collect();
        for shard in due {
            let Some(held) = self.held.get(&shard) else { continue };
            let mut lease = held.lease.clone();
            if let Some(spec) = lease.spec.as_mut() {
                spec.renew_time = Some(MicroTime(Timestamp::now()));
                spec.lease_duration_seconds = Some(self.duration_seconds());
            }
            let sent = Instant::now();
            match self.write(&lease).await {
                Ok(written) => {
                    let held = self.held.get_mut(&shard).expect("held");
                    held.fence.extend_to(sent + self.config.duration.saturating_sub(margin));
                    held.lease = written;
                    held.renewed_at = sent;
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    // Changed by someone else: still ours only if it still names us.
                    match self.api.get_opt(&shard_lease_name(shard)).await {
                        Ok(Some(current))
                            if current.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                                == Some(self.config.identity.as_str()) =>
                        {
                            self.held.get_mut(&shard).expect("held").lease = current;
                        }
                        Ok(current) => {
                            let holder = current
                                .and_then(|l| l.spec.and_then(|s| s.holder_identity))
                                .unwrap_or_else(|| "nobody".into());
                            self.lost(shard, &format!("the Lease now names {holder}"));
                        }
                        Err(e) => debug!(shard, error = %e, "re-reading a shard Lease failed"),
                    }
                }
                Err(e) => warn!(shard, error = %e, "renewing a shard Lease failed; retrying"),
            }
        }
        // A shard whose fence closed (no renewal in time) is lost, whatever the API server says
        // later: someone else may own it by now.
        let closed: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, h)| !h.fence.is_open())
            .map(|(s, _)| *s)
            .collect();
        for shard in closed {
            self.lost(shard, "its Lease could not be renewed in time");
        }
    }

    fn lost(&mut self, shard: u32, why: &str) {
        if let Some(held) = self.held.remove(&shard) {
            held.fence.close();
        }
        self.releasing.remove(&shard);
        self.placement.set(shard, Location::Unowned);
        warn!(shard, identity = %self.config.identity, why, "shard lost: its work stopped at once");
        let _ = self.events.send(ShardEvent::Lost(shard));
    }

    fn update_placement(&self, members: &BTreeMap<String, String>) {
        for shard in 0..SHARD_COUNT {
            if self.held.contains_key(&shard) {
                continue;
            }
            let location = self
                .lease(&shard_lease_name(shard))
                .filter(|l| !self.expired(l))
                .and_then(|l| l.spec.as_ref()?.holder_identity.clone())
                .filter(|holder| *holder != self.config.identity)
                .and_then(|holder| {
                    let address = members.get(&holder).filter(|a| !a.is_empty())?.clone();
                    Some(Location::Peer {
                        identity: holder,
                        address,
                    })
                })
                .unwrap_or(Location::Unowned);
            self.placement.set(shard, location);
        }
    }

    /// Takes a free shard; its fence when won.
    async fn acquire(&mut self, shard: u32) -> Option<Fence> {
        let name = shard_lease_name(shard);
        let existing = self.lease(&name);
        // The cache may have moved on since the plan was made: the write is conditional on the
        // version judged here, and that version must still be free.
        if let Some(lease) = &existing {
            let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref());
            let free = match holder {
                None => true,
                Some(holder) => holder == self.config.identity || self.expired(lease),
            };
            if !free {
                return None;
            }
        }
        let mut lease = existing
            .as_deref()
            .cloned()
            .unwrap_or_else(|| self.new_lease(&name, "shard"));
        let previous = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
        let spec = lease.spec.get_or_insert_with(Default::default);
        let now = MicroTime(Timestamp::now());
        if previous.as_deref() != Some(&self.config.identity) {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.config.identity.clone());
        spec.lease_duration_seconds = Some(self.duration_seconds());
        spec.acquire_time = Some(now.clone());
        spec.renew_time = Some(now);
        let sent = Instant::now();
        match self.write(&lease).await {
            Ok(written) => {
                let fence =
                    Fence::until(sent + self.config.duration.saturating_sub(fence_margin(self.config.duration)));
                info!(shard, from = previous.as_deref().unwrap_or("nobody"), to = %self.config.identity,
                    "shard handed over");
                self.config.metrics.shard_handover();
                self.placement.set(shard, Location::Moving);
                self.generations += 1;
                self.held.insert(
                    shard,
                    Held {
                        generation: self.generations,
                        fence: fence.clone(),
                        lease: written,
                        renewed_at: sent,
                    },
                );
                Some(fence)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                debug!(shard, "another replica took the shard first");
                None
            }
            Err(e) => {
                warn!(shard, error = %e, "taking a shard Lease failed");
                None
            }
        }
    }

    /// Starts handing a shard over: its work drains, then [`Self::released`] frees the Lease.
    fn release(&mut self, shard: u32) {
        let Some(generation) = self.held.get(&shard).map(|h| h.generation) else {
            return;
        };
        if !self.releasing.insert(shard) {
            return;
        }
        info!(shard, identity = %self.config.identity, "handing a shard over");
        self.placement.set(shard, Location::Moving);
        let (done, drained) = oneshot::channel();
        let _ = self.events.send(ShardEvent::Release { shard, done });
        let released = self.released_tx.clone();
        let timeout = self.config.drain_timeout + Duration::from_secs(2);
        tokio::spawn(async move {
            // A dispatcher that is gone has nothing left to drain.
            let drained = tokio::time::timeout(timeout, drained).await.is_ok();
            let _ = released.send(Released {
                shard,
                generation,
                drained,
            });
        });
    }

    /// The shard's work has stopped: release its Lease so another replica takes it at once. If
    /// it did not drain in time, the fence closes and the Lease is left to expire instead.
    async fn released(&mut self, done: Released) {
        let Released {
            shard,
            generation,
            drained,
        } = done;
        if self.held.get(&shard).is_none_or(|h| h.generation != generation) {
            return;
        }
        self.releasing.remove(&shard);
        let Some(held) = self.held.remove(&shard) else { return };
        held.fence.close();
        self.placement.set(shard, Location::Unowned);
        if !drained {
            warn!(
                shard,
                "the shard's work did not stop in time; its Lease expires instead of being released"
            );
            let _ = self.events.send(ShardEvent::Lost(shard));
            return;
        }
        let mut lease = held.lease;
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
        }
        match self.write(&lease).await {
            Ok(_) => info!(shard, from = %self.config.identity, "shard released"),
            Err(e) => warn!(shard, error = %e, "releasing a shard Lease failed; it expires instead"),
        }
    }
}

/// A hand-over's end, from the task that waited for the shard to drain.
struct Released {
    shard: u32,
    generation: u64,
    /// Whether its work stopped before the timeout.
    drained: bool,
}

/// Whether a Lease's own `renewTime` is within its duration (and a few seconds of clock skew)
/// of `now`. Membership only sets the fair share, never who may write, so the holder's clock may
/// be trusted here: without it, a replica that just started would count every replica that died
/// without releasing its membership as alive until it had watched that Lease for a whole
/// duration, and take too few shards meanwhile.
/// The replica a membership Lease stands for and the address it advertises: believed only from
/// the replica's own Lease, `capy-webhooks-replica-<identity>` held by that identity. A Lease
/// whose name and holder disagree (made by whoever may write Leases, or a replica's Lease taken
/// over) is ignored: otherwise it could point the others' forwarded work, signed with the
/// replicas' key, at any address.
fn membership(lease: &Lease) -> Option<(String, String)> {
    if lease.labels().get(LEASE_ROLE_LABEL).map(String::as_str) != Some("replica") {
        return None;
    }
    let holder = lease.spec.as_ref()?.holder_identity.clone()?;
    if holder.is_empty() || lease.metadata.name.as_deref() != Some(replica_lease_name(&holder).as_str()) {
        return None;
    }
    let address = lease.annotations().get(ADDRESS_ANNOTATION).cloned().unwrap_or_default();
    Some((holder, address))
}

fn recently_renewed(lease: &Lease, now: Timestamp) -> bool {
    const SKEW: i64 = 5;
    let Some(spec) = lease.spec.as_ref() else {
        return false;
    };
    let Some(MicroTime(renewed)) = spec.renew_time else {
        return false;
    };
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15).max(1));
    now.as_second() - renewed.as_second() <= duration + SKEW
}

/// The pod this process runs in, as the owner of its membership Lease (`POD_NAME` and `POD_UID`
/// from the downward API), so the Lease is garbage-collected with the pod.
fn pod_owner() -> Option<Vec<OwnerReference>> {
    let name = std::env::var("POD_NAME").ok().filter(|n| !n.is_empty())?;
    let uid = std::env::var("POD_UID").ok().filter(|u| !u.is_empty())?;
    Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name,
        uid,
        ..Default::default()
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_address_is_believed_only_from_its_own_lease() {
        let lease = |name: &str, holder: Option<&str>, role: &str| Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(BTreeMap::from([(LEASE_ROLE_LABEL.to_string(), role.to_string())])),
                annotations: Some(BTreeMap::from([(
                    ADDRESS_ANNOTATION.to_string(),
                    "10.0.0.9:8081".to_string(),
                )])),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                ..Default::default()
            }),
        };
        assert_eq!(
            membership(&lease("capy-webhooks-replica-pod-a", Some("pod-a"), "replica")),
            Some(("pod-a".to_string(), "10.0.0.9:8081".to_string()))
        );
        // Names are made from identities as replicas make them (lower case, `_` → `-`).
        assert!(membership(&lease("capy-webhooks-replica-pod-b", Some("Pod_B"), "replica")).is_some());
        // A Lease naming another replica (or none) as holder is nobody's membership.
        assert_eq!(
            membership(&lease("capy-webhooks-replica-pod-a", Some("pod-b"), "replica")),
            None
        );
        assert_eq!(
            membership(&lease("capy-webhooks-replica-evil", Some("pod-a"), "replica")),
            None
        );
        assert_eq!(membership(&lease("anything", Some("pod-a"), "replica")), None);
        assert_eq!(membership(&lease("capy-webhooks-replica-pod-a", None, "replica")), None);
        assert_eq!(membership(&lease("capy-webhooks-replica-", Some(""), "replica")), None);
        // Only membership Leases count.
        assert_eq!(
            membership(&lease("capy-webhooks-replica-pod-a", Some("pod-a"), "shard")),
            None
        );
    }

    #[test]
    fn members_that_stopped_renewing_long_ago_do_not_count() {
        let lease = |renewed_secs_ago: i64| Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some("a".into()),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(
                    Timestamp::now() - jiff::SignedDuration::from_secs(renewed_secs_ago),
                )),
                ..Default::default()
            }),
            ..Default::default()
        };
        let now = Timestamp::now();
        assert!(recently_renewed(&lease(1), now));
        assert!(
            recently_renewed(&lease(19), now),
            "a few seconds of clock skew are allowed"
        );
        assert!(!recently_renewed(&lease(60), now));
        assert!(!recently_renewed(&Lease::default(), now));
    }

    #[test]
    fn fences_close_well_before_anyone_may_take_over() {
        for secs in [2, 6, 15, 60] {
            let d = Duration::from_secs(secs);
            let open_for = d.saturating_sub(fence_margin(d));
            // A renewal comes before the fence closes: a holder that renews never stops working.
            assert!(renew_interval(d) < open_for, "{secs}s");
            if secs >= 6 {
                assert!(
                    renew_interval(d) * 2 < open_for,
                    "{secs}s: one failed renewal is survived"
                );
            }
            assert!(fence_margin(d) >= Duration::from_secs(1));
        }
    }
}
