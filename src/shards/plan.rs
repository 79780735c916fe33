//! The balancing rule, as a pure function of what the Leases say.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};

use super::SHARD_COUNT;

/// One shard Lease, as this replica sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardLeaseView {
    /// `holderIdentity`; `None` when released (or never held).
    pub holder: Option<String>,
    /// Whether it went a whole Lease duration without a renewal, by this replica's clock.
    pub expired: bool,
}

/// What this replica knows when it plans.
#[derive(Clone, Debug, Default)]
pub struct LeaseView {
    /// This replica's identity.
    pub me: String,
    /// Identities of the live replicas (membership Leases not expired); this one counts anyway.
    pub members: BTreeSet<String>,
    /// Every shard's Lease, by shard (missing: never created, so free).
    pub shards: Vec<ShardLeaseView>,
    /// Shards this replica holds and works on.
    pub held: BTreeSet<u32>,
    /// Shards this replica is handing over (neither kept nor taken again until released).
    pub releasing: BTreeSet<u32>,
}

/// What to do next.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Free shards to take, in order.
    pub acquire: Vec<u32>,
    /// Held shards to hand over.
    pub release: Vec<u32>,
}

/// How many shards no replica holds: neither held by this one (`held`, which may be newer than
/// the Leases seen) nor named by a Lease that has not expired. For
/// `capy_webhooks_shards_unowned`.
pub fn unowned(shards: &[ShardLeaseView], held: &BTreeSet<u32>) -> usize {
    (0..SHARD_COUNT)
        .filter(|shard| !held.contains(shard))
        .filter(|&shard| match shards.get(shard as usize) {
            Some(lease) => lease.holder.is_none() || lease.expired,
            None => true,
        })
        .count()
}

/// Most shards one replica should hold with `members` live replicas: the fair share, rounded up.
pub fn fair_share(members: usize) -> usize {
    (SHARD_COUNT as usize).div_ceil(members.max(1))
}

/// Decides which shards to take and which to hand over, so that every live replica ends up with
/// its fair share (rounded up, so none holds more than the fair share + 1):
/// - a replica above its share releases its highest-numbered shards;
/// - a replica below takes free ones (released, never held, or expired), starting at a point that
///   depends on its identity, so replicas starting together do not race for the same shards.
///
/// A shard held by another replica is never taken before its Lease expired; a shard whose Lease
/// still names this replica (a restart under the same identity) is taken back at once.
pub fn plan(view: &LeaseView) -> Plan {
    let mut members = view.members.clone();
    members.insert(view.me.clone());
    let fair = fair_share(members.len());
    let kept: Vec<u32> = view
        .held
        .iter()
        .copied()
        .filter(|s| !view.releasing.contains(s))
        .collect();
    let mut plan = Plan::default();
    if kept.len() > fair {
        plan.release = kept.iter().rev().take(kept.len() - fair).copied().collect();
        return plan;
    }
    let wanted = fair - kept.len();
    if wanted == 0 {
        return plan;
    }
    let start = {
        let digest = Sha256::digest(view.me.as_bytes());
        u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % SHARD_COUNT
    };
    let free = |shard: u32| {
        if view.held.contains(&shard) || view.releasing.contains(&shard) {
            return false;
        }
        match view.shards.get(shard as usize) {
            None => true,
            Some(lease) => match &lease.holder {
                None => true,
                Some(holder) if *holder == view.me => true,
                Some(_) => lease.expired,
            },
        }
    };
    plan.acquire = (0..SHARD_COUNT)
        .map(|i| (start + i) % SHARD_COUNT)
        .filter(|&s| free(s))
        .take(wanted)
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unowned_shards_are_those_no_live_lease_names_and_this_replica_does_not_hold() {
        let held_by = |h: &str| ShardLeaseView {
            holder: Some(h.into()),
            expired: false,
        };
        let mut shards = vec![held_by("a"); SHARD_COUNT as usize];
        assert_eq!(unowned(&shards, &BTreeSet::new()), 0);
        shards[3] = ShardLeaseView::default();
        shards[4].expired = true;
        assert_eq!(unowned(&shards, &BTreeSet::new()), 2);
        assert_eq!(
            unowned(&shards, &BTreeSet::from([4])),
            1,
            "just acquired: the Lease seen is older"
        );
        assert_eq!(
            unowned(&shards[..10], &BTreeSet::new()),
            8,
            "missing Leases: never created"
        );
    }

    fn view(me: &str, members: &[&str], holders: &[Option<&str>]) -> LeaseView {
        let shards = (0..SHARD_COUNT as usize)
            .map(|i| ShardLeaseView {
                holder: holders.get(i).copied().flatten().map(str::to_string),
                expired: false,
            })
            .collect::<Vec<_>>();
        let held = shards
            .iter()
            .enumerate()
            .filter(|(_, l)| l.holder.as_deref() == Some(me))
            .map(|(i, _)| i as u32)
            .collect();
        LeaseView {
            me: me.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
            shards,
            held,
            releasing: BTreeSet::new(),
        }
    }

    /// Runs every replica's plan in turn, applying it, until nothing changes.
    fn settle(members: &[&str], holders: &mut Vec<Option<String>>) -> usize {
        let mut rounds = 0;
        loop {
            rounds += 1;
            assert!(rounds < 50, "the plan never settles: {holders:?}");
            let mut changed = false;
            for me in members {
                let h: Vec<Option<&str>> = holders.iter().map(|h| h.as_deref()).collect();
                let p = plan(&view(me, members, &h));
                for s in p.release {
                    holders[s as usize] = None;
                    changed = true;
                }
                for s in p.acquire {
                    if holders[s as usize].is_none() {
                        holders[s as usize] = Some(me.to_string());
                        changed = true;
                    }
                }
            }
            if !changed {
                return rounds;
            }
        }
    }

    fn counts(members: &[&str], holders: &[Option<String>]) -> Vec<usize> {
        members
            .iter()
            .map(|m| holders.iter().filter(|h| h.as_deref() == Some(*m)).count())
            .collect()
    }

    #[test]
    fn one_replica_takes_every_shard() {
        let p = plan(&view("a", &["a"], &[]));
        assert_eq!(p.acquire.len(), SHARD_COUNT as usize);
        assert!(p.release.is_empty());
    }

    #[test]
    fn replicas_that_join_get_a_fair_share_and_nothing_stays_unowned() {
        let mut holders: Vec<Option<String>> = vec![Some("a".into()); SHARD_COUNT as usize];
        settle(&["a", "b", "c"], &mut holders);
        let c = counts(&["a", "b", "c"], &holders);
        assert!(holders.iter().all(Option::is_some), "{holders:?}");
        let fair = fair_share(3);
        assert!(c.iter().all(|&n| (1..=fair).contains(&n)), "{c:?}");
        assert_eq!(c.iter().sum::<usize>(), SHARD_COUNT as usize);
        // Scale back to one: the survivor takes everything the others released.
        let mut back: Vec<Option<String>> = holders.into_iter().map(|h| h.filter(|h| h == "a")).collect();
        settle(&["a"], &mut back);
        assert_eq!(counts(&["a"], &back), vec![SHARD_COUNT as usize]);
    }

    #[test]
    fn shards_held_by_others_are_taken_only_once_expired() {
        let mut v = view("b", &["b"], &[Some("a"); SHARD_COUNT as usize]);
        assert!(plan(&v).acquire.is_empty(), "a's Leases are still valid");
        v.shards[4].expired = true;
        assert_eq!(plan(&v).acquire, vec![4]);
        // Its own name on a Lease (restart under the same identity): taken back at once.
        v.shards[7].holder = Some("b".into());
        v.held.clear();
        assert!(plan(&v).acquire.contains(&7));
    }

    #[test]
    fn a_replica_above_its_share_releases_its_highest_shards_and_not_twice() {
        let holders: Vec<Option<&str>> = (0..SHARD_COUNT).map(|_| Some("a")).collect();
        let mut v = view("a", &["a", "b"], &holders);
        assert_eq!(plan(&v).release, vec![15, 14, 13, 12, 11, 10, 9, 8]);
        v.releasing = (8..16).collect();
        assert_eq!(plan(&v), Plan::default(), "those being released are not released again");
    }

    #[test]
    fn replicas_starting_together_begin_at_different_shards() {
        let a = plan(&view("replica-a", &["replica-a", "replica-b"], &[]));
        let b = plan(&view("replica-b", &["replica-a", "replica-b"], &[]));
        assert_eq!(a.acquire.len(), 8);
        assert_ne!(a.acquire[0], b.acquire[0]);
    }
}
