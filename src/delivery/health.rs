//! Endpoint health from recent attempt outcomes, and when a failing endpoint is disabled.
//!
//! [`HealthWindow`] keeps the recent outcomes of one endpoint; [`health`] turns them into the
//! [`Health`] shown in the API and the CR status; [`should_auto_disable`] says when an endpoint
//! has failed for long enough that it is disabled (with a reason in status, never silently), and
//! [`disabled_reason`] which reason that status shows.

use std::collections::VecDeque;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

pub use crate::resources::Health;

/// How many outcomes a [`HealthWindow`] keeps by default (and how many the rule looks at).
pub const DEFAULT_CAPACITY: usize = 20;

/// Consecutive failures, counted back from the newest outcome, that make an endpoint failing.
pub const FAILING_STREAK: u64 = 5;

/// How many of the newest outcomes the degraded rule looks at.
pub const DEGRADED_WINDOW: usize = 20;

/// The failure share, in percent, of those outcomes that makes an endpoint degraded.
pub const DEGRADED_PERCENT: usize = 10;

/// The recent attempt outcomes of one endpoint, newest last.
///
/// The ring keeps the last `capacity` outcomes for the ratio rule. The current failure streak,
/// the last success and the last failure are tracked beside it, because they must survive the
/// ring: an endpoint failing many times a minute fills a 20-slot ring in seconds, yet its
/// streak started days ago and that is what [`should_auto_disable`] must see.
///
/// Outcomes are expected in time order; the dispatcher records them as attempts finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthWindow {
    outcomes: VecDeque<(Timestamp, bool)>,
    capacity: usize,
    /// Failures since the last success (or since the first outcome).
    streak_len: u64,
    /// When the current failure streak began; `None` when the newest outcome is a success.
    streak_start: Option<Timestamp>,
    last_success: Option<Timestamp>,
    last_failure: Option<Timestamp>,
}

impl Default for HealthWindow {
    fn default() -> Self {
        HealthWindow::with_capacity(DEFAULT_CAPACITY)
    }
}

impl HealthWindow {
    /// An empty window keeping the last `capacity` outcomes (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        HealthWindow {
            outcomes: VecDeque::with_capacity(capacity),
            capacity,
            streak_len: 0,
            streak_start: None,
            last_success: None,
            last_failure: None,
        }
    }

    /// Records an attempt that finished at `at`; the oldest outcome drops out when full.
    pub fn record(&mut self, at: Timestamp, success: bool) {
        if self.outcomes.len() == self.capacity {
            self.outcomes.pop_front();
        }
        self.outcomes.push_back((at, success));
        if success {
            self.streak_len = 0;
            self.streak_start = None;
            self.last_success = Some(at);
        } else {
            self.streak_len = self.streak_len.saturating_add(1);
            self.streak_start.get_or_insert(at);
            self.last_failure = Some(at);
        }
    }

    /// The retained outcomes, oldest first: `(finished at, succeeded)`.
    pub fn outcomes(&self) -> impl ExactSizeIterator<Item = (Timestamp, bool)> + '_ {
        self.outcomes.iter().copied()
    }

    /// How many outcomes are retained.
    pub fn len(&self) -> usize {
        self.outcomes.len()
    }

    /// Whether no outcome was ever recorded.
    pub fn is_empty(&self) -> bool {
        self.outcomes.is_empty()
    }

    /// How many outcomes the window retains at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Failures since the last success, including those that left the ring.
    pub fn consecutive_failures(&self) -> u64 {
        self.streak_len
    }

    /// When the current failure streak began, or `None` if the newest outcome is a success
    /// (or there is none).
    pub fn first_failure_of_current_streak(&self) -> Option<Timestamp> {
        self.streak_start
    }

    /// When the last successful attempt finished.
    pub fn last_success(&self) -> Option<Timestamp> {
        self.last_success
    }

    /// When the last failed attempt finished.
    pub fn last_failure(&self) -> Option<Timestamp> {
        self.last_failure
    }
}

/// The health of an endpoint, from whether it is active and its recent attempt outcomes.
///
/// The rule, checked in this order:
///
/// 1. An inactive endpoint is **disabled**.
/// 2. An endpoint with no attempt yet is **unknown**.
/// 3. If the last 5 attempts or more all failed (5 consecutive failures, counted back from the
///    newest), it is **failing**.
/// 4. Otherwise, if at least 10 % of the last 20 attempts (or of all attempts, when there are
///    fewer than 20) failed, it is **degraded**.
/// 5. Otherwise it is **healthy**.
///
/// A success, a timeout or an HTTP error each count as one attempt. So one failure among the
/// last 20 attempts is tolerated, two make the endpoint degraded, and a success after a
/// failing streak brings it back to degraded, then to healthy as the failures age out.
pub fn health(active: bool, window: &HealthWindow) -> Health {
    if !active {
        return Health::Disabled;
    }
    if window.is_empty() {
        return Health::Unknown;
    }
    if window.consecutive_failures() >= FAILING_STREAK {
        return Health::Failing;
    }
    let recent = window.outcomes.iter().rev().take(DEGRADED_WINDOW);
    let considered = recent.len();
    let failures = recent.filter(|(_, success)| !success).count();
    // Integer form of failures / considered >= 10 %, so the boundary is exact.
    if failures > 0 && failures * 100 >= considered * DEGRADED_PERCENT {
        Health::Degraded
    } else {
        Health::Healthy
    }
}

/// Whether an endpoint has failed long enough to be disabled automatically.
///
/// True when the newest attempt failed, every attempt since the first failure of the current
/// streak failed too, and that first failure happened at least `failing_window` before `now`:
/// a streak of failures spanning the whole window, as Svix and Stripe do (Svix disables after
/// five days of failures). One success anywhere in the window resets it.
///
/// Call it after recording a failure: the streak's length in time is then backed by attempts,
/// which the retry schedule makes at least every few hours while deliveries are pending.
pub fn should_auto_disable(window: &HealthWindow, now: Timestamp, failing_window: Duration) -> bool {
    let Some(first_failure) = window.first_failure_of_current_streak() else {
        return false;
    };
    // A window too long to represent can never be reached.
    let Ok(failing_window) = SignedDuration::try_from(failing_window) else {
        return false;
    };
    now.duration_since(first_failure) >= failing_window
}

/// The `disabled_reason` an endpoint's status summary shows, and what the dispatcher keeps of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisabledReason {
    /// Whether the endpoint was seen inactive since the dispatcher last disabled it.
    pub seen_inactive: bool,
    /// The reason the dispatcher keeps: the one it disabled the endpoint for, until a user
    /// re-activates it.
    pub kept: Option<String>,
    /// What the status summary shows.
    pub shown: Option<String>,
}

/// The `disabled_reason` rule, when a status summary is written: an endpoint active again after
/// it was seen inactive was re-activated by a user, so the kept reason goes; an active endpoint
/// shows a reason only while the dispatcher's own disabling is on its way (kept, not yet seen
/// inactive); an inactive one shows the kept reason, else the one its status already has (from
/// an earlier owner of its log).
pub fn disabled_reason(
    active: bool,
    seen_inactive: bool,
    kept: Option<&str>,
    in_status: Option<&str>,
) -> DisabledReason {
    let kept = if active && seen_inactive { None } else { kept };
    let shown = if active && kept.is_none() {
        None
    } else {
        kept.or(in_status).map(str::to_string)
    };
    DisabledReason {
        seen_inactive: seen_inactive || !active,
        kept: kept.map(str::to_string),
        shown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    /// A window from a string of outcomes, oldest first: `s` success, `f` failure, one second apart.
    fn window(outcomes: &str) -> HealthWindow {
        let mut w = HealthWindow::default();
        for (i, c) in outcomes.chars().enumerate() {
            w.record(at(i as i64), c == 's');
        }
        w
    }

    #[test]
    fn inactive_is_disabled_whatever_the_outcomes() {
        for outcomes in ["", "s", "fffff", "sfsfs"] {
            assert_eq!(health(false, &window(outcomes)), Health::Disabled, "{outcomes}");
        }
    }

    #[test]
    fn no_outcome_is_unknown() {
        assert_eq!(health(true, &HealthWindow::default()), Health::Unknown);
    }

    #[test]
    fn five_consecutive_failures_are_failing() {
        assert_eq!(health(true, &window("fffff")), Health::Failing);
        assert_eq!(health(true, &window("sssssfffff")), Health::Failing);
        assert_eq!(health(true, &window(&"f".repeat(100))), Health::Failing);
        // Four are not (but are degraded).
        assert_eq!(health(true, &window("ffff")), Health::Degraded);
        assert_eq!(health(true, &window("ssssssssssssssssffff")), Health::Degraded);
        // A success at the end breaks the streak.
        assert_eq!(health(true, &window("fffffs")), Health::Degraded);
    }

    #[test]
    fn streak_counts_failures_that_left_the_ring() {
        let mut w = HealthWindow::with_capacity(3);
        for i in 0..10 {
            w.record(at(i), false);
        }
        assert_eq!(w.len(), 3);
        assert_eq!(w.consecutive_failures(), 10);
        assert_eq!(w.first_failure_of_current_streak(), Some(at(0)));
        assert_eq!(health(true, &w), Health::Failing);
    }

    #[test]
    fn ten_percent_of_the_last_twenty_is_degraded() {
        // 2 of 20 = 10 %: degraded; 1 of 20 = 5 %: healthy.
        assert_eq!(health(true, &window("ssssssssfsssssssssfs")), Health::Degraded);
        assert_eq!(health(true, &window("sssssssssssssssssssf")), Health::Healthy);
        assert_eq!(health(true, &window("fsssssssssssssssssss")), Health::Healthy);
        // With fewer than 10 outcomes any failure is at least 10 %.
        assert_eq!(health(true, &window("fs")), Health::Degraded);
        assert_eq!(health(true, &window("sssssssssf")), Health::Degraded);
        // 1 of 11 is 9 %.
        assert_eq!(health(true, &window("ssssssssssf")), Health::Healthy);
        assert_eq!(health(true, &window("f")), Health::Degraded);
    }

    #[test]
    fn only_the_last_twenty_count() {
        // Old failures age out of the window.
        let w = window(&format!("ffff{}", "s".repeat(20)));
        assert_eq!(w.len(), 20);
        assert_eq!(health(true, &w), Health::Healthy);
        // A bigger ring still judges the degraded share over the last 20 only.
        let mut big = HealthWindow::with_capacity(50);
        for (i, c) in format!("ffffffffff{}", "s".repeat(20)).chars().enumerate() {
            big.record(at(i as i64), c == 's');
        }
        assert_eq!(health(true, &big), Health::Healthy);
        big.record(at(100), false);
        big.record(at(101), true);
        assert_eq!(health(true, &big), Health::Healthy);
        big.record(at(102), false);
        assert_eq!(health(true, &big), Health::Degraded);
    }

    #[test]
    fn all_successes_are_healthy() {
        assert_eq!(health(true, &window("s")), Health::Healthy);
        assert_eq!(health(true, &window(&"s".repeat(40))), Health::Healthy);
    }

    #[test]
    fn ring_is_bounded_and_ordered() {
        let mut w = HealthWindow::default();
        assert!(w.is_empty());
        assert_eq!(w.capacity(), DEFAULT_CAPACITY);
        for i in 0..25 {
            w.record(at(i), i % 2 == 0);
        }
        assert_eq!(w.len(), 20);
        let kept: Vec<_> = w.outcomes().collect();
        assert_eq!(kept.first(), Some(&(at(5), false)));
        assert_eq!(kept.last(), Some(&(at(24), true)));
        assert_eq!(HealthWindow::with_capacity(0).capacity(), 1);
    }

    #[test]
    fn tracks_last_success_failure_and_streak() {
        let mut w = HealthWindow::default();
        assert_eq!((w.last_success(), w.last_failure()), (None, None));
        assert_eq!(w.first_failure_of_current_streak(), None);
        w.record(at(1), true);
        w.record(at(2), false);
        w.record(at(3), false);
        assert_eq!(w.last_success(), Some(at(1)));
        assert_eq!(w.last_failure(), Some(at(3)));
        assert_eq!(w.consecutive_failures(), 2);
        assert_eq!(w.first_failure_of_current_streak(), Some(at(2)));
        w.record(at(4), true);
        assert_eq!(w.consecutive_failures(), 0);
        assert_eq!(w.first_failure_of_current_streak(), None);
        assert_eq!(w.last_success(), Some(at(4)));
        assert_eq!(w.last_failure(), Some(at(3)));
        w.record(at(5), false);
        assert_eq!(w.first_failure_of_current_streak(), Some(at(5)));
        // The last success survives leaving the ring.
        let mut small = HealthWindow::with_capacity(2);
        small.record(at(1), true);
        for i in 2..10 {
            small.record(at(i), false);
        }
        assert_eq!(small.last_success(), Some(at(1)));
    }

    #[test]
    fn auto_disable_after_a_streak_spanning_the_window() {
        let window_len = Duration::from_secs(5 * DAY);
        let mut w = HealthWindow::default();
        w.record(at(0), true);
        w.record(at(10), false);
        w.record(at(3600), false);
        let days = |d: u64| at(10 + (d * DAY) as i64);
        assert!(!should_auto_disable(&w, days(1), window_len));
        // Exactly the window: disabled (the boundary is inclusive); one second less: not yet.
        assert!(should_auto_disable(&w, days(5), window_len));
        assert!(!should_auto_disable(&w, at(10 + (5 * DAY) as i64 - 1), window_len));
        assert!(should_auto_disable(&w, days(9), window_len));
    }

    #[test]
    fn a_success_resets_the_streak() {
        let window_len = Duration::from_secs(5 * DAY);
        let mut w = HealthWindow::default();
        w.record(at(0), false);
        w.record(at(DAY as i64), false);
        w.record(at(3 * DAY as i64), true);
        w.record(at(4 * DAY as i64), false);
        let now = at(6 * DAY as i64);
        // Failures began 6 days ago, but the current streak only 2 days ago.
        assert!(!should_auto_disable(&w, now, window_len));
        assert!(should_auto_disable(&w, at(9 * DAY as i64), window_len));
        // Ending on a success never disables.
        w.record(at(9 * DAY as i64), true);
        assert!(!should_auto_disable(&w, at(100 * DAY as i64), window_len));
    }

    #[test]
    fn auto_disable_edge_cases() {
        let empty = HealthWindow::default();
        assert!(!should_auto_disable(&empty, at(100 * DAY as i64), Duration::ZERO));
        let w = window("f");
        // A zero window disables on the first failure; a clock behind the failure does not.
        assert!(should_auto_disable(&w, at(0), Duration::ZERO));
        assert!(!should_auto_disable(&w, at(-10), Duration::from_secs(1)));
        assert!(!should_auto_disable(&w, at(10 * DAY as i64), Duration::MAX));
        // Streaks longer than the ring still measure from their true start.
        let mut small = HealthWindow::with_capacity(3);
        for h in 0..200 {
            small.record(at(h * 3600), false);
        }
        assert!(should_auto_disable(
            &small,
            at(199 * 3600),
            Duration::from_secs(5 * DAY)
        ));
    }

    #[test]
    fn disabled_reason_rule() {
        const OURS: Option<&str> = Some("every delivery attempt failed since then");
        const THEIRS: Option<&str> = Some("the receiver answered 410 Gone");
        // (active, seen inactive, kept, in status) => (seen inactive, kept, shown)
        #[allow(clippy::type_complexity)]
        let table: [(
            (bool, bool, Option<&str>, Option<&str>),
            (bool, Option<&str>, Option<&str>),
        ); 10] = [
            // Active and never disabled: nothing to show, whatever an old status says.
            ((true, false, None, None), (false, None, None)),
            ((true, false, None, THEIRS), (false, None, None)),
            // Disabled by this dispatcher, the patch not seen yet: the reason shows already.
            ((true, false, OURS, None), (false, OURS, OURS)),
            ((true, false, OURS, THEIRS), (false, OURS, OURS)),
            // Seen inactive: noted, and the reason shows (ours first, else the status's).
            ((false, false, OURS, None), (true, OURS, OURS)),
            ((false, true, OURS, THEIRS), (true, OURS, OURS)),
            ((false, false, None, THEIRS), (true, None, THEIRS)),
            // Disabled by a user: no reason of ours, none in status.
            ((false, false, None, None), (true, None, None)),
            // Active again after being seen inactive: a user re-activated it, the reason goes.
            ((true, true, OURS, THEIRS), (true, None, None)),
            ((true, true, None, None), (true, None, None)),
        ];
        for ((active, seen, kept, status), (want_seen, want_kept, want_shown)) in table {
            let rule = disabled_reason(active, seen, kept, status);
            let case = (active, seen, kept, status);
            assert_eq!(rule.seen_inactive, want_seen, "{case:?}");
            assert_eq!(rule.kept.as_deref(), want_kept, "{case:?}");
            assert_eq!(rule.shown.as_deref(), want_shown, "{case:?}");
        }
    }
}
