//! Which of an endpoint's due deliveries start now, and when the next one may.
//!
//! The dispatcher keeps, per endpoint, its durable pending deliveries by due time, the attempts in
//! flight and, with a rate limit, the time before which no attempt starts ([`Lane`]). Here is
//! what it does with them at a given time: [`next_start`] (when to look again) and
//! [`plan_starts`] (what to send, skip, fail or postpone). Plain data in, a decision out.
//!
//! A `fifo` endpoint ([`crate::resources::Ordering::Fifo`]) has a rule of its own
//! ([`next_fifo_start`], [`plan_fifo_start`]): its head is its oldest pending delivery by ingest
//! order, `(created_at, id)` ([`ingest_key_after`] keeps that order the order in which the
//! worker accepted them), and only the head may be attempted, one attempt at a time; a retry of
//! the head keeps its place, so nothing behind it starts before it succeeds or fails for good.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use jiff::Timestamp;

use crate::delivery::schedule::paced;

/// How long a delivery waits when its endpoint's signing keys are not readable yet (the
/// controller has not written, or is repairing, the Secret); no attempt is spent meanwhile.
pub const SIGNING_KEYS_WAIT: Duration = Duration::from_secs(2);

/// One endpoint's schedule, as the dispatcher keeps it.
#[derive(Debug, Clone, Copy)]
pub struct Lane<'a> {
    /// Durable pending deliveries by due time: `(due at, delivery id)`.
    pub due: &'a BTreeSet<(Timestamp, String)>,
    /// Attempts of this endpoint in flight.
    pub in_flight: usize,
    /// With a rate limit, no attempt of this endpoint starts before this time.
    pub paced_until: Timestamp,
}

/// What the dispatcher finds of a due delivery when it is its turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Pending, not in flight, its payload at hand: it may be sent.
    Ready,
    /// Finished meanwhile, gone, or already in flight: nothing to do.
    Stale,
    /// Pending, but the event's payload is not in the log: it can never be sent.
    PayloadLost,
}

/// What becomes of one due delivery taken off the lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Attempt it now.
    Send,
    /// Nothing: it is not (or no longer) due for an attempt of its own.
    Skip,
    /// It fails without an attempt: its payload was lost.
    Fail,
    /// Due again at this time, without spending an attempt (the signing keys are not there).
    Postpone(Timestamp),
}

/// What to do with an endpoint's due deliveries now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartPlan {
    /// The deliveries taken off the lane, in order, each with what becomes of it.
    pub steps: Vec<((Timestamp, String), Start)>,
    /// Attempts in flight once those sent have started.
    pub in_flight: usize,
    /// The lane's pacing once those sent have started.
    pub paced_until: Timestamp,
}

/// When an attempt of `lane` may start next: the first due time, held back by the pacing;
/// `None` when nothing is due or `concurrency` attempts are in flight already.
pub fn next_start(lane: &Lane<'_>, concurrency: usize) -> Option<Timestamp> {
    if lane.in_flight >= concurrency {
        return None;
    }
    lane.due.first().map(|(at, _)| (*at).max(lane.paced_until))
}

/// Decides which due deliveries of `lane` start at `now`, oldest due first.
///
/// Nothing starts for an endpoint that is not `active`. Otherwise deliveries due by `now` are
/// taken while fewer than `concurrency` attempts are in flight and the pacing allows one more
/// (each start moves it by `1/rate_limit`, see [`paced`]). `found` says what each one is when
/// its turn comes; a delivery taken twice in one plan starts once. Without `signing_keys` (the
/// signing keys, and the client certificate of an endpoint that names one), the
/// first delivery that could be sent is postponed by [`SIGNING_KEYS_WAIT`] and the plan ends
/// there.
pub fn plan_starts(
    lane: &Lane<'_>,
    concurrency: usize,
    rate_limit: Option<u32>,
    active: bool,
    signing_keys: bool,
    now: Timestamp,
    found: impl Fn(&str) -> Found,
) -> StartPlan {
    let mut plan = StartPlan {
        steps: Vec::new(),
        in_flight: lane.in_flight,
        paced_until: lane.paced_until,
    };
    if !active {
        return plan;
    }
    let mut taken: HashSet<&str> = HashSet::new();
    for (at, id) in lane.due {
        if plan.in_flight >= concurrency || *at > now || plan.paced_until > now {
            break;
        }
        // Taken already in this plan: sent or failed, so no longer due.
        let found = if taken.insert(id) { found(id) } else { Found::Stale };
        let step = match found {
            Found::Stale => Start::Skip,
            _ if !signing_keys => Start::Postpone(now + SIGNING_KEYS_WAIT),
            Found::PayloadLost => Start::Fail,
            Found::Ready => {
                plan.in_flight += 1;
                if let Some(rate) = rate_limit {
                    plan.paced_until = paced(plan.paced_until, now, rate);
                }
                Start::Send
            }
        };
        plan.steps.push(((*at, id.clone()), step));
        if matches!(step, Start::Postpone(_)) {
            break;
        }
    }
    plan
}

/// What the dispatcher finds of a pending delivery of a `fifo` endpoint when it looks at the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// Finished, or gone: no longer in the queue.
    Gone,
    /// Pending but not startable: its attempt is in flight, or it is not durable yet. It holds
    /// the queue.
    Busy,
    /// Pending and durable, its next attempt due at this time.
    Due(Timestamp),
    /// Pending, but the event's payload is not in the log: it fails without an attempt.
    PayloadLost,
}

/// When the head of a `fifo` lane may start: `order` holds its pending deliveries by ingest order
/// (`(created_at, id)`); `None` while an attempt is in flight, the head is busy, or nothing is
/// pending. Deliveries found gone are passed over (the next plan drops them).
pub fn next_fifo_start(
    order: &BTreeSet<(Timestamp, String)>,
    in_flight: usize,
    paced_until: Timestamp,
    queued: impl Fn(&str) -> Queued,
) -> Option<Timestamp> {
    if in_flight > 0 {
        return None;
    }
    for (_, id) in order {
        match queued(id) {
            Queued::Gone => continue,
            Queued::Busy => return None,
            Queued::Due(at) => return Some(at.max(paced_until)),
            Queued::PayloadLost => return Some(Timestamp::MIN),
        }
    }
    None
}

/// Decides what of a `fifo` lane starts at `now`: at most one attempt, of the head.
///
/// Walks `order` (pending deliveries by ingest order): those gone are dropped (`Skip`), those
/// whose payload was lost fail (`Fail`) and the next becomes the head; a busy head (in flight, not
/// durable yet) holds everything. A head due by `now`, with the pacing allowing it, is sent;
/// without `signing_keys` nothing is sent and the lane is paced [`SIGNING_KEYS_WAIT`] ahead
/// instead (the head keeps its place). Nothing starts for an endpoint that is not `active` or has
/// an attempt in flight. Steps name deliveries by their `order` key.
#[allow(clippy::too_many_arguments)]
pub fn plan_fifo_start(
    order: &BTreeSet<(Timestamp, String)>,
    in_flight: usize,
    paced_until: Timestamp,
    rate_limit: Option<u32>,
    active: bool,
    signing_keys: bool,
    now: Timestamp,
    queued: impl Fn(&str) -> Queued,
) -> StartPlan {
    let mut plan = StartPlan {
        steps: Vec::new(),
        in_flight,
        paced_until,
    };
    if !active || in_flight > 0 {
        return plan;
    }
    for key in order {
        let step = match queued(&key.1) {
            Queued::Gone => Start::Skip,
            Queued::PayloadLost => Start::Fail,
            Queued::Busy => break,
            Queued::Due(at) if at > now || plan.paced_until > now => break,
            Queued::Due(_) if !signing_keys => {
                plan.paced_until = now + SIGNING_KEYS_WAIT;
                break;
            }
            Queued::Due(_) => {
                plan.in_flight = 1;
                if let Some(rate) = rate_limit {
                    plan.paced_until = paced(plan.paced_until, now, rate);
                }
                plan.steps.push((key.clone(), Start::Send));
                break;
            }
        };
        plan.steps.push((key.clone(), step));
    }
    plan
}

/// The `created_at` a new delivery of a `fifo` endpoint is stored with, so that its ingest key
/// `(created_at, id)` comes after `last`, the newest key pending for the endpoint: its own when it
/// does already; else `last`'s time (when its id is greater) or one millisecond later. Ids of one
/// millisecond are random, and two replicas' clocks differ: without this, a delivery accepted
/// after another could sort before it.
pub fn ingest_key_after(last: Option<&(Timestamp, String)>, created_at: Timestamp, id: &str) -> Timestamp {
    match last {
        Some((at, last_id)) if (created_at, id) <= (*at, last_id.as_str()) => {
            if id > last_id.as_str() {
                *at
            } else {
                *at + jiff::SignedDuration::from_millis(1)
            }
        }
        _ => created_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    /// A lane from `(due second, id)` pairs.
    fn due(entries: &[(i64, &str)]) -> BTreeSet<(Timestamp, String)> {
        entries.iter().map(|(s, id)| (at(*s), id.to_string())).collect()
    }

    /// The ids of a plan with what becomes of each.
    fn steps(plan: &StartPlan) -> Vec<(&str, Start)> {
        plan.steps.iter().map(|((_, id), step)| (id.as_str(), *step)).collect()
    }

    fn lane(due: &BTreeSet<(Timestamp, String)>, in_flight: usize, paced_until: i64) -> Lane<'_> {
        Lane {
            due,
            in_flight,
            paced_until: at(paced_until),
        }
    }

    fn ready(_: &str) -> Found {
        Found::Ready
    }

    #[test]
    fn next_start_is_the_first_due_time_held_back_by_pacing() {
        let entries = due(&[(10, "a"), (20, "b")]);
        // (in flight, paced until, concurrency) => next start
        let table = [
            ((0, 0, 2), Some(at(10))),
            ((1, 0, 2), Some(at(10))),
            ((0, 15, 2), Some(at(15))),
            ((0, 5, 2), Some(at(10))),
            ((2, 0, 2), None),
            ((3, 0, 2), None),
        ];
        for ((in_flight, paced, concurrency), want) in table {
            let lane = lane(&entries, in_flight, paced);
            assert_eq!(
                next_start(&lane, concurrency),
                want,
                "{in_flight} {paced} {concurrency}"
            );
        }
        let empty = BTreeSet::new();
        let lane = lane(&empty, 0, 0);
        assert_eq!(next_start(&lane, 8), None);
    }

    #[test]
    fn what_starts_now() {
        use Start::*;
        let entries = due(&[(1, "a"), (2, "b"), (3, "c"), (50, "later")]);
        let found = |id: &str| match id {
            "b" => Found::Stale,
            "c" => Found::PayloadLost,
            _ => Found::Ready,
        };
        // (active, signing keys, in flight, concurrency, rate limit) => steps
        #[allow(clippy::type_complexity)]
        let table: [((bool, bool, usize, usize, Option<u32>), Vec<(&str, Start)>); 7] = [
            // Everything due by now, in due order; the later one waits.
            ((true, true, 0, 8, None), vec![("a", Send), ("b", Skip), ("c", Fail)]),
            // An inactive endpoint starts nothing.
            ((false, true, 0, 8, None), vec![]),
            // No slot left: nothing; one slot: the first that is sent takes it.
            ((true, true, 8, 8, None), vec![]),
            ((true, true, 7, 8, None), vec![("a", Send)]),
            // A rate limit lets one start per interval.
            ((true, true, 0, 8, Some(1)), vec![("a", Send)]),
            // No signing keys yet: skipped ones go, the first sendable waits two seconds.
            ((true, false, 0, 8, None), vec![("a", Postpone(at(12)))]),
            ((true, true, 0, 1, None), vec![("a", Send)]),
        ];
        for ((active, keys, in_flight, concurrency, rate), want) in table {
            let lane = lane(&entries, in_flight, 0);
            let plan = plan_starts(&lane, concurrency, rate, active, keys, at(10), found);
            let case = (active, keys, in_flight, concurrency, rate);
            assert_eq!(steps(&plan), want, "{case:?}");
            let sent = want.iter().filter(|(_, s)| *s == Send).count();
            assert_eq!(plan.in_flight, in_flight + sent, "{case:?}");
        }
    }

    #[test]
    fn without_keys_stale_deliveries_are_dropped_before_the_wait() {
        let entries = due(&[(1, "done"), (2, "next"), (3, "after")]);
        let found = |id: &str| if id == "done" { Found::Stale } else { Found::Ready };
        let lane = lane(&entries, 0, 0);
        let plan = plan_starts(&lane, 8, None, true, false, at(10), found);
        assert_eq!(
            steps(&plan),
            vec![("done", Start::Skip), ("next", Start::Postpone(at(12)))]
        );
        assert_eq!(plan.in_flight, 0);
    }

    #[test]
    fn pacing_moves_with_each_start_and_holds_when_ahead() {
        let entries = due(&[(1, "a"), (2, "b"), (3, "c")]);
        let lane = lane(&entries, 0, 0);
        // Two per second: the first starts at once and takes the slot until 10.5 s.
        let plan = plan_starts(&lane, 8, Some(2), true, true, at(10), ready);
        assert_eq!(steps(&plan), vec![("a", Start::Send)]);
        assert_eq!(
            plan.paced_until,
            at(10).checked_add(jiff::SignedDuration::from_millis(500)).unwrap()
        );
        // Paced beyond now: nothing starts, and the lane is untouched.
        let held = Lane {
            paced_until: at(11),
            ..lane
        };
        let plan = plan_starts(&held, 8, Some(2), true, true, at(10), ready);
        assert_eq!(plan.steps, vec![]);
        assert_eq!(plan.paced_until, at(11));
    }

    #[test]
    fn a_delivery_due_twice_starts_once() {
        let entries = due(&[(1, "a"), (2, "a"), (3, "b")]);
        let lane = lane(&entries, 0, 0);
        let plan = plan_starts(&lane, 8, None, true, true, at(10), ready);
        assert_eq!(
            steps(&plan),
            vec![("a", Start::Send), ("a", Start::Skip), ("b", Start::Send)]
        );
        assert_eq!(plan.in_flight, 2);
    }

    /// A fifo lane's lookup from `(id, what it is)` pairs; unknown ids are gone.
    fn queued<'a>(table: &'a [(&'a str, Queued)]) -> impl Fn(&str) -> Queued + 'a {
        move |id| {
            table
                .iter()
                .find(|(name, _)| *name == id)
                .map_or(Queued::Gone, |(_, q)| *q)
        }
    }

    fn fifo_plan(
        order: &BTreeSet<(Timestamp, String)>,
        in_flight: usize,
        rate: Option<u32>,
        table: &[(&str, Queued)],
    ) -> StartPlan {
        plan_fifo_start(order, in_flight, at(0), rate, true, true, at(10), queued(table))
    }

    #[test]
    fn a_fifo_head_blocks_the_deliveries_behind_it() {
        use Queued::*;
        // Ingest order a, b, c; b and c are due long before a's retry.
        let order = due(&[(1, "a"), (2, "b"), (3, "c")]);
        let table = [("a", Due(at(30))), ("b", Due(at(2))), ("c", Due(at(3)))];
        let plan = fifo_plan(&order, 0, None, &table);
        assert_eq!(steps(&plan), vec![], "nothing behind a waiting head starts");
        assert_eq!(next_fifo_start(&order, 0, at(0), queued(&table)), Some(at(30)));
        // The head in flight (or not durable yet) holds the lane too.
        let busy = [("a", Busy), ("b", Due(at(2)))];
        assert_eq!(steps(&fifo_plan(&order, 0, None, &busy)), vec![]);
        assert_eq!(next_fifo_start(&order, 0, at(0), queued(&busy)), None);
        // One attempt in flight: nothing, whatever is due.
        let due_now = [("a", Due(at(1))), ("b", Due(at(2)))];
        assert_eq!(steps(&fifo_plan(&order, 1, None, &due_now)), vec![]);
        assert_eq!(next_fifo_start(&order, 1, at(0), queued(&due_now)), None);
        // Due: the head alone starts, whatever else is due.
        let plan = fifo_plan(&order, 0, None, &due_now);
        assert_eq!(steps(&plan), vec![("a", Start::Send)]);
        assert_eq!(plan.in_flight, 1);
    }

    #[test]
    fn a_retried_head_keeps_its_place() {
        use Queued::*;
        // a failed its first attempt and is due again at 12; b arrived meanwhile, due at 5.
        let order = due(&[(1, "a"), (4, "b")]);
        let table = [("a", Due(at(12))), ("b", Due(at(5)))];
        assert_eq!(steps(&fifo_plan(&order, 0, None, &table)), vec![]);
        let later = plan_fifo_start(&order, 0, at(0), None, true, true, at(12), queued(&table));
        assert_eq!(steps(&later), vec![("a", Start::Send)]);
    }

    #[test]
    fn a_finished_head_releases_the_next() {
        use Queued::*;
        // a succeeded or exhausted its attempts (gone from the log's pending ones); x lost its
        // payload: both leave the queue and b starts.
        let order = due(&[(1, "a"), (2, "x"), (3, "b"), (4, "c")]);
        let table = [("x", PayloadLost), ("b", Due(at(3))), ("c", Due(at(4)))];
        let plan = fifo_plan(&order, 0, None, &table);
        assert_eq!(
            steps(&plan),
            vec![("a", Start::Skip), ("x", Start::Fail), ("b", Start::Send)]
        );
        assert_eq!(next_fifo_start(&order, 0, at(0), queued(&table)), Some(Timestamp::MIN));
        assert_eq!(next_fifo_start(&BTreeSet::new(), 0, at(0), queued(&table)), None);
    }

    #[test]
    fn a_fifo_lane_is_paced_and_waits_for_its_keys() {
        use Queued::*;
        let order = due(&[(1, "a"), (2, "b")]);
        let table = [("a", Due(at(1))), ("b", Due(at(2)))];
        // Two per second: a starts and moves the pacing half a second on.
        let plan = fifo_plan(&order, 0, Some(2), &table);
        assert_eq!(steps(&plan), vec![("a", Start::Send)]);
        assert_eq!(plan.paced_until, at(10) + jiff::SignedDuration::from_millis(500));
        // Paced beyond now: nothing, and the next start waits for the pacing.
        let held = plan_fifo_start(&order, 0, at(11), Some(2), true, true, at(10), queued(&table));
        assert_eq!(steps(&held), vec![]);
        assert_eq!(next_fifo_start(&order, 0, at(11), queued(&table)), Some(at(11)));
        // Without signing keys the head keeps its place and the lane waits.
        let keyless = plan_fifo_start(&order, 0, at(0), None, true, false, at(10), queued(&table));
        assert_eq!(steps(&keyless), vec![]);
        assert_eq!(keyless.paced_until, at(12));
        // Inactive: nothing.
        let paused = plan_fifo_start(&order, 0, at(0), None, false, true, at(10), queued(&table));
        assert_eq!(steps(&paused), vec![]);
    }

    #[test]
    fn ingest_keys_follow_the_order_deliveries_were_accepted() {
        let ms = |n: i64| Timestamp::from_millisecond(1_700_000_000_000 + n).unwrap();
        let last = (ms(5), "msg_m".to_string());
        // Later: kept.
        assert_eq!(ingest_key_after(Some(&last), ms(6), "msg_a"), ms(6));
        assert_eq!(ingest_key_after(None, ms(1), "msg_a"), ms(1));
        // Same millisecond, greater id: kept.
        assert_eq!(ingest_key_after(Some(&last), ms(5), "msg_z"), ms(5));
        // Same millisecond, smaller id, or an earlier clock: after the last.
        assert_eq!(ingest_key_after(Some(&last), ms(5), "msg_a"), ms(6));
        assert_eq!(ingest_key_after(Some(&last), ms(2), "msg_z"), ms(5));
        assert_eq!(ingest_key_after(Some(&last), ms(2), "msg_a"), ms(6));
        for (created, id) in [(ms(5), "msg_a"), (ms(2), "msg_z"), (ms(9), "msg_0")] {
            let key = (ingest_key_after(Some(&last), created, id), id.to_string());
            assert!(key > last, "{key:?}");
        }
    }
}
