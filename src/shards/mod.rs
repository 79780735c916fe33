//! Dispatch partitioned over replicas: organizations hash to a fixed number of shards, and each
//! shard belongs to one replica at a time through a `coordination.k8s.io` Lease.
//!
//! The contract (README, "Several replicas"): [`SHARD_COUNT`] shards, shard of an organization =
//! the first four bytes of SHA-256 of its id, big-endian, modulo [`SHARD_COUNT`]; shard `n` is held
//! through Lease `capy-webhooks-shard-NN`, and each live replica renews its membership Lease
//! `capy-webhooks-replica-<identity>`, which also carries the address other replicas forward to.
//!
//! This module holds what the dispatcher and the forwarder ([`crate::forwarder`]) share: the shard
//! function, the [`Placement`] table (which the dispatcher fills and checks, and the forwarder
//! routes by; neither ingest nor the REST facade reads it), and the [`Fence`] a writer checks
//! before each write. [`plan`] is the pure balancing rule; [`coordinator`] is its IO edge on the Leases.

pub mod coordinator;
mod plan;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

pub use plan::{LeaseView, Plan, ShardLeaseView, plan, unowned};

/// How many shards dispatch is partitioned into. A contract: changing it moves organizations
/// between shards, so every replica of a cluster must agree on it.
pub const SHARD_COUNT: u32 = 16;

/// Prefix of the shard Leases' names: `capy-webhooks-shard-00` to `capy-webhooks-shard-15`.
pub const SHARD_LEASE_PREFIX: &str = "capy-webhooks-shard-";

/// Prefix of the membership Leases' names, followed by the replica's identity.
pub const REPLICA_LEASE_PREFIX: &str = "capy-webhooks-replica-";

/// Annotation of a membership Lease: the address (`host:port`) of the replica's internal port.
pub const ADDRESS_ANNOTATION: &str = "webhooks.capydb.io/address";

/// Label that marks the Leases of dispatch (`shard` or `replica`), so one watch sees them all.
pub const LEASE_ROLE_LABEL: &str = "webhooks.capydb.io/lease-role";

/// The shard an organization's events, logs and attempts belong to.
pub fn shard_of(organization_id: &str) -> u32 {
    let digest = Sha256::digest(organization_id.as_bytes());
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % SHARD_COUNT
}

/// Name of shard `shard`'s Lease.
pub fn shard_lease_name(shard: u32) -> String {
    format!("{SHARD_LEASE_PREFIX}{shard:02}")
}

/// The shard a Lease name holds, if it is a shard Lease.
pub fn shard_of_lease(name: &str) -> Option<u32> {
    let n: u32 = name.strip_prefix(SHARD_LEASE_PREFIX)?.parse().ok()?;
    (n < SHARD_COUNT && shard_lease_name(n) == name).then_some(n)
}

/// Name of a replica's membership Lease: its identity, lower-cased, with characters an object
/// name cannot hold replaced by `-`.
pub fn replica_lease_name(identity: &str) -> String {
    let clean: String = identity
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let clean = clean.trim_matches(|c| c == '-' || c == '.');
    let mut name = format!("{REPLICA_LEASE_PREFIX}{clean}");
    name.truncate(253);
    name.trim_end_matches(['-', '.']).to_string()
}

/// A fixed origin for the fences' deadlines (an `Instant` fits no atomic).
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn millis_of(at: Instant) -> u64 {
    at.saturating_duration_since(origin()).as_millis() as u64
}

/// Until when this replica may write a shard's logs: moved forward by each Lease renewal, to
/// the renewal's start plus the Lease duration minus a margin, so it ends before any other replica
/// may take the shard (which waits a whole duration after it last saw the Lease change). Shared
/// by every worker of the shard; cheap to check before each write.
#[derive(Clone, Debug)]
pub struct Fence(Arc<AtomicU64>);

impl Fence {
    /// A fence that never closes: one process that owns every shard without Leases.
    pub fn open() -> Self {
        Self(Arc::new(AtomicU64::new(u64::MAX)))
    }

    /// A fence open until `until`.
    pub fn until(until: Instant) -> Self {
        Self(Arc::new(AtomicU64::new(millis_of(until))))
    }

    /// Moves the deadline to `until`, never backwards (renewals may answer out of order), and
    /// never once it has passed: a renewal that answers after the fence closed does not reopen
    /// it (the workers it guarded have stopped; the shard is lost and taken again afresh).
    pub fn extend_to(&self, until: Instant) {
        let target = millis_of(until);
        let now = millis_of(Instant::now());
        let _ = self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
            (current != u64::MAX && current > now && target > current).then_some(target)
        });
    }

    /// Resolves once the fence has closed (checked every 50 ms at most).
    pub async fn closed(&self) {
        loop {
            let left = self.remaining();
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left.min(Duration::from_millis(50))).await;
        }
    }

    /// Closes the fence now: the shard was lost or released.
    pub fn close(&self) {
        self.0.store(0, Ordering::Release);
    }

    /// Time left to write; zero once closed.
    pub fn remaining(&self) -> Duration {
        let deadline = self.0.load(Ordering::Acquire);
        if deadline == u64::MAX {
            return Duration::MAX;
        }
        Duration::from_millis(deadline.saturating_sub(millis_of(Instant::now())))
    }

    /// Whether this replica may still write.
    pub fn is_open(&self) -> bool {
        !self.remaining().is_zero()
    }
}

/// Where a shard's work is done, as this replica knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// Here, and its logs are read back: work is done locally.
    Here,
    /// Here, but not ready: its logs are being read back, or it is being handed over.
    Moving,
    /// At another replica, reached at this address.
    Peer {
        /// The owner's identity.
        identity: String,
        /// `host:port` of its internal port.
        address: String,
    },
    /// Nobody holds it right now (its owner died or released it and no one took it yet).
    Unowned,
}

/// Which replica does each shard's work: written by the coordinator (who holds what) and the
/// dispatcher (when a shard it holds is ready), read on every request that must reach an owner.
#[derive(Clone, Debug)]
pub struct Placement {
    table: Arc<RwLock<BTreeMap<u32, Location>>>,
}

impl Default for Placement {
    fn default() -> Self {
        Self::new()
    }
}

impl Placement {
    /// Every shard unowned.
    pub fn new() -> Self {
        Self {
            table: Arc::new(RwLock::new((0..SHARD_COUNT).map(|s| (s, Location::Unowned)).collect())),
        }
    }

    /// Where `shard`'s work is done.
    pub fn locate(&self, shard: u32) -> Location {
        self.table
            .read()
            .expect("placement lock")
            .get(&shard)
            .cloned()
            .unwrap_or(Location::Unowned)
    }

    /// Where an organization's work is done.
    pub fn locate_organization(&self, organization_id: &str) -> Location {
        self.locate(shard_of(organization_id))
    }

    /// Sets where `shard`'s work is done.
    pub fn set(&self, shard: u32, location: Location) {
        self.table.write().expect("placement lock").insert(shard, location);
    }

    /// Marks a shard this replica holds as ready, unless it moved meanwhile.
    pub fn set_ready(&self, shard: u32) {
        let mut table = self.table.write().expect("placement lock");
        if table.get(&shard) == Some(&Location::Moving) {
            table.insert(shard, Location::Here);
        }
    }

    /// The shards this replica holds (ready or not).
    pub fn held_here(&self) -> Vec<u32> {
        self.table
            .read()
            .expect("placement lock")
            .iter()
            .filter(|(_, l)| matches!(l, Location::Here | Location::Moving))
            .map(|(s, _)| *s)
            .collect()
    }
}

/// What the coordinator tells the dispatcher about the shards it holds.
#[derive(Debug)]
pub enum ShardEvent {
    /// These shards are now held: read their logs back, then start their work.
    Acquired(Vec<(u32, Fence)>),
    /// Hand this shard over: stop its work gracefully (in-flight attempts finish, every change is
    /// written), then answer, so the Lease can be released.
    Release {
        /// The shard.
        shard: u32,
        /// Answered once its work has stopped.
        done: tokio::sync::oneshot::Sender<()>,
    },
    /// This shard was lost (its Lease could not be renewed in time): its fence is closed; stop at
    /// once, writing nothing more.
    Lost(u32),
}

/// The dispatcher's side of shard ownership: the events to act on and the table to mark ready.
pub struct ShardFeed {
    /// Events from the coordinator.
    pub events: mpsc::UnboundedReceiver<ShardEvent>,
    /// Where each shard's work is done.
    pub placement: Placement,
}

impl ShardFeed {
    /// Every shard held for good, without Leases: one process that is the only replica (tests,
    /// and embedding).
    pub fn all_here() -> Self {
        let placement = Placement::new();
        let (tx, events) = mpsc::unbounded_channel();
        let fence = Fence::open();
        for shard in 0..SHARD_COUNT {
            placement.set(shard, Location::Moving);
        }
        let _ = tx.send(ShardEvent::Acquired(
            (0..SHARD_COUNT).map(|s| (s, fence.clone())).collect(),
        ));
        // The sender is dropped: nothing changes afterwards.
        Self { events, placement }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn organizations_spread_over_every_shard_and_stay_put() {
        let mut counts = [0u32; SHARD_COUNT as usize];
        for i in 0..1600 {
            counts[shard_of(&format!("org_{i}")) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (60..=140).contains(&c)), "{counts:?}");
        // A contract: the same id always lands on the same shard, on every replica and version.
        assert_eq!(shard_of("org_1"), shard_of("org_1"));
        let digest = Sha256::digest(b"org_1");
        assert_eq!(
            shard_of("org_1"),
            u32::from_be_bytes(digest[..4].try_into().unwrap()) % 16
        );
    }

    #[test]
    fn lease_names_round_trip() {
        assert_eq!(shard_lease_name(3), "capy-webhooks-shard-03");
        assert_eq!(shard_of_lease("capy-webhooks-shard-03"), Some(3));
        assert_eq!(shard_of_lease("capy-webhooks-shard-3"), None);
        assert_eq!(shard_of_lease("capy-webhooks-shard-16"), None);
        assert_eq!(shard_of_lease("capy-webhooks-controller"), None);
        assert_eq!(replica_lease_name("Pod_A-1"), "capy-webhooks-replica-pod-a-1");
        assert!(replica_lease_name(&"x".repeat(400)).len() <= 253);
    }

    #[test]
    fn fences_close_and_only_move_forward() {
        let now = Instant::now();
        let fence = Fence::until(now + Duration::from_secs(10));
        assert!(fence.is_open());
        fence.extend_to(now + Duration::from_secs(5));
        assert!(fence.remaining() > Duration::from_secs(8), "never moves back");
        fence.close();
        assert!(!fence.is_open());
        fence.extend_to(now + Duration::from_secs(60));
        assert!(!fence.is_open(), "a late renewal never reopens a closed fence");
        let past = Fence::until(now);
        assert!(!past.is_open());
        past.extend_to(now + Duration::from_secs(60));
        assert!(!past.is_open(), "nor one whose deadline passed");
        assert!(Fence::open().is_open());
    }

    #[test]
    fn placement_marks_ready_only_what_is_still_moving_here() {
        let placement = Placement::new();
        assert_eq!(placement.locate(1), Location::Unowned);
        placement.set(1, Location::Moving);
        placement.set_ready(1);
        assert_eq!(placement.locate(1), Location::Here);
        placement.set(
            2,
            Location::Peer {
                identity: "b".into(),
                address: "10.0.0.2:8081".into(),
            },
        );
        placement.set_ready(2);
        assert!(matches!(placement.locate(2), Location::Peer { .. }));
        assert_eq!(placement.held_here(), vec![1]);
    }
}
