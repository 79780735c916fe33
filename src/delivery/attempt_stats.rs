//! An endpoint's attempts of the last 24 hours, by hour: how many succeeded, how many failed, and
//! how long the successful ones took (median and 95th percentile). What the portal's chart shows
//! (`GET .../webhook-endpoints/{id}/stats`).
//!
//! The dispatcher keeps one [`AttemptHistory`] per endpoint in memory, fed as attempts finish
//! ([`AttemptHistory::record`]); nothing of it is written to the API server (every attempt would
//! cost a write). It is bounded whatever the traffic: at most [`HOURS`] hours, each a pair of
//! counters and a fixed histogram of [`LATENCY_BUCKETS`] counters. [`AttemptHistory::stats`] turns
//! it into the hourly view. Plain data: no clock reads, no IO.

use std::collections::VecDeque;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// How many hours are kept and shown: the current one and the 23 before it.
pub const HOURS: usize = 24;

/// Latency buckets per doubling: each bucket's upper bound is 2^(1/4) (about 1.19) times its
/// lower one, so an estimated percentile is within about 10 % of the true value.
const BUCKETS_PER_DOUBLING: f64 = 4.0;

/// Latency buckets of an hour: from 1 ms up to 2^16 ms (about 65 s, beyond any attempt timeout);
/// the first bucket also holds everything under 1 ms, the last everything longer.
pub const LATENCY_BUCKETS: usize = 64;

const SECONDS_PER_HOUR: i64 = 3600;

/// The attempts of one hour.
#[derive(Clone, Debug, PartialEq)]
struct Hour {
    /// Hours since the Unix epoch (UTC): the hour `[index h, index h + 1)`.
    index: i64,
    succeeded: u64,
    failed: u64,
    /// Successful attempts by latency bucket ([`bucket_of`]).
    latency: [u32; LATENCY_BUCKETS],
    /// Shortest and longest successful attempt, in milliseconds: estimates never leave them (and
    /// one attempt's percentiles are its own latency).
    min_ms: f64,
    max_ms: f64,
}

impl Hour {
    fn new(index: i64) -> Self {
        Self {
            index,
            succeeded: 0,
            failed: 0,
            latency: [0; LATENCY_BUCKETS],
            min_ms: f64::INFINITY,
            max_ms: 0.0,
        }
    }
}

/// The hour index (hours since the Unix epoch, UTC) of `t`.
fn hour_of(t: Timestamp) -> i64 {
    t.as_second().div_euclid(SECONDS_PER_HOUR)
}

/// Milliseconds, as a float (sub-millisecond answers on a LAN are common).
fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The latency bucket of `ms`: bucket `i` holds `[2^(i/4), 2^((i+1)/4))` ms; the first also
/// everything shorter, the last everything longer.
fn bucket_of(ms: f64) -> usize {
    if ms < 1.0 || ms.is_nan() {
        return 0;
    }
    let i = (ms.log2() * BUCKETS_PER_DOUBLING).floor();
    (i as usize).min(LATENCY_BUCKETS - 1)
}

/// Lower and upper bound of bucket `i`, in milliseconds.
fn bucket_bounds(i: usize) -> (f64, f64) {
    let bound = |i: usize| (i as f64 / BUCKETS_PER_DOUBLING).exp2();
    let lower = if i == 0 { 0.0 } else { bound(i) };
    (lower, bound(i + 1))
}

/// The `q` quantile (0 < q <= 1) of the latencies counted in `hour`, estimated from its
/// histogram by the nearest-rank rule, interpolated inside the bucket the rank falls in and kept
/// within the hour's shortest and longest latency; `None` when nothing succeeded.
fn quantile(hour: &Hour, q: f64) -> Option<f64> {
    let total: u64 = hour.latency.iter().map(|&n| u64::from(n)).sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut below = 0u64;
    for (i, &n) in hour.latency.iter().enumerate() {
        let n = u64::from(n);
        if n == 0 {
            continue;
        }
        if below + n >= rank {
            let (lower, mut upper) = bucket_bounds(i);
            if i == LATENCY_BUCKETS - 1 {
                // The last bucket has no upper bound but the longest attempt.
                upper = upper.max(hour.max_ms);
            }
            // The bucket's samples spread evenly over it: the rank's share of the way through.
            let within = (rank - below) as f64 - 0.5;
            let estimate = lower + (upper - lower) * within / n as f64;
            return Some(estimate.clamp(hour.min_ms, hour.max_ms));
        }
        below += n;
    }
    Some(hour.max_ms)
}

/// Latency in milliseconds as shown: one decimal.
fn shown_ms(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}

/// One endpoint's attempts of the last [`HOURS`] hours, by hour (see the module's
/// documentation). Attempts may be recorded a little out of order (several in flight): each goes
/// to its own hour.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttemptHistory {
    /// Oldest first; only hours that had an attempt.
    hours: VecDeque<Hour>,
}

impl AttemptHistory {
    /// Counts an attempt that ended at `at`, succeeded or not; `latency` (how long it took) is
    /// kept for successes only. Hours more than [`HOURS`] before the newest are dropped; an
    /// attempt that old is not counted.
    pub fn record(&mut self, at: Timestamp, succeeded: bool, latency: Duration) {
        let index = hour_of(at);
        let newest = self.hours.back().map_or(index, |h| h.index.max(index));
        let oldest_kept = newest - (HOURS as i64 - 1);
        if index < oldest_kept {
            return;
        }
        while self.hours.front().is_some_and(|h| h.index < oldest_kept) {
            self.hours.pop_front();
        }
        let position = match self.hours.binary_search_by_key(&index, |h| h.index) {
            Ok(found) => found,
            Err(insert_at) => {
                self.hours.insert(insert_at, Hour::new(index));
                insert_at
            }
        };
        let hour = &mut self.hours[position];
        if succeeded {
            let ms = millis(latency);
            hour.succeeded += 1;
            let bucket = &mut hour.latency[bucket_of(ms)];
            *bucket = bucket.saturating_add(1);
            hour.min_ms = hour.min_ms.min(ms);
            hour.max_ms = hour.max_ms.max(ms);
        } else {
            hour.failed += 1;
        }
    }

    /// The last [`HOURS`] hours up to `now`'s (included), oldest first, every hour present (zeros
    /// where nothing was attempted). `since` is when counting began (see [`AttemptStats::since`]).
    pub fn stats(&self, now: Timestamp, since: Timestamp) -> AttemptStats {
        let current = hour_of(now);
        let first = current - (HOURS as i64 - 1);
        let hours = (first..=current)
            .map(|index| {
                let start = Timestamp::from_second(index * SECONDS_PER_HOUR).unwrap_or(Timestamp::UNIX_EPOCH);
                match self.hours.iter().find(|h| h.index == index) {
                    Some(hour) => HourStats {
                        start,
                        succeeded: hour.succeeded,
                        failed: hour.failed,
                        latency_p50_ms: quantile(hour, 0.5).map(shown_ms),
                        latency_p95_ms: quantile(hour, 0.95).map(shown_ms),
                    },
                    None => HourStats {
                        start,
                        succeeded: 0,
                        failed: 0,
                        latency_p50_ms: None,
                        latency_p95_ms: None,
                    },
                }
            })
            .collect();
        AttemptStats { since, hours }
    }
}

/// One hour of an endpoint's attempts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HourStats {
    /// The hour's start (UTC, on the hour).
    pub start: Timestamp,
    /// Attempts answered with a 2xx.
    pub succeeded: u64,
    /// Attempts that failed: any other status, a timeout, a connection error, an address refused.
    pub failed: u64,
    /// Median latency of the successful attempts, in milliseconds (estimated to within about
    /// 10 %); `None` when none succeeded.
    pub latency_p50_ms: Option<f64>,
    /// 95th percentile of the same.
    pub latency_p95_ms: Option<f64>,
}

/// An endpoint's attempts of the last [`HOURS`] hours, as counted by the replica that sends
/// them. Also what that replica answers another one that forwarded the question.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttemptStats {
    /// When counting began: the counts live in the memory of the replica that sends the
    /// endpoint's attempts, so they start empty when it takes the endpoint's organization over
    /// (at its start, or when the organization's shard moves to it). Hours before this show
    /// nothing because nothing was counted, not because nothing happened.
    pub since: Timestamp,
    /// Oldest first; the last one is the current hour.
    pub hours: Vec<HourStats>,
}

impl AttemptStats {
    /// Successful attempts of every hour shown.
    pub fn succeeded(&self) -> u64 {
        self.hours.iter().map(|h| h.succeeded).sum()
    }

    /// Failed attempts of every hour shown.
    pub fn failed(&self) -> u64 {
        self.hours.iter().map(|h| h.failed).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// 2026-12-07T10:00:00Z.
    const TEN: i64 = 1_796_637_600;

    #[test]
    fn attempts_land_in_their_hour_and_every_hour_is_shown() {
        let mut history = AttemptHistory::default();
        history.record(at(TEN + 5), true, MS(40));
        history.record(at(TEN + 3599), false, MS(1));
        history.record(at(TEN + 3600), true, MS(80));
        history.record(at(TEN + 3600 + 10), false, MS(5));
        history.record(at(TEN + 3600 + 20), false, MS(5));
        let stats = history.stats(at(TEN + 3600 + 30), at(TEN));
        assert_eq!(stats.hours.len(), HOURS);
        assert_eq!(stats.since, at(TEN));
        let last = &stats.hours[HOURS - 1];
        assert_eq!(last.start, at(TEN + 3600));
        assert_eq!((last.succeeded, last.failed), (1, 2));
        let before = &stats.hours[HOURS - 2];
        assert_eq!((before.start, before.succeeded, before.failed), (at(TEN), 1, 1));
        assert!(stats.hours[..HOURS - 2].iter().all(|h| h.succeeded + h.failed == 0));
        assert!(
            stats
                .hours
                .windows(2)
                .all(|w| w[1].start.as_second() - w[0].start.as_second() == 3600)
        );
        assert_eq!((stats.succeeded(), stats.failed()), (2, 3));
        // One success in an hour: its percentiles are its latency, exactly.
        assert_eq!((last.latency_p50_ms, last.latency_p95_ms), (Some(80.0), Some(80.0)));
        // No success: no latency.
        assert_eq!(stats.hours[0].latency_p50_ms.or(stats.hours[0].latency_p95_ms), None);
    }

    #[test]
    fn only_the_last_day_is_kept_and_shown() {
        let mut history = AttemptHistory::default();
        for hour in 0..30 {
            history.record(at(TEN + hour * 3600), hour % 2 == 0, MS(10));
        }
        assert_eq!(history.hours.len(), HOURS, "bounded");
        let now = at(TEN + 29 * 3600 + 60);
        let stats = history.stats(now, at(TEN));
        assert_eq!(stats.hours[0].start, at(TEN + 6 * 3600));
        assert_eq!(stats.succeeded() + stats.failed(), 24);
        // Read much later: what is older than a day is not shown, though still held.
        let later = history.stats(at(TEN + 40 * 3600), at(TEN));
        assert_eq!(later.succeeded() + later.failed(), 30 - 17);
        // An attempt recorded a day late is not counted; a late one within the day is.
        history.record(at(TEN + 5 * 3600), true, MS(1));
        assert_eq!(history.stats(now, at(TEN)).succeeded(), 12);
        history.record(at(TEN + 28 * 3600 + 1), true, MS(1));
        let stats = history.stats(now, at(TEN));
        assert_eq!(stats.hours[HOURS - 2].succeeded, 2);
        assert_eq!(history.hours.len(), HOURS);
    }

    #[test]
    fn an_empty_history_shows_a_day_of_zeros() {
        let stats = AttemptHistory::default().stats(at(TEN + 1800), at(TEN + 1700));
        assert_eq!(stats.hours.len(), HOURS);
        assert_eq!(stats.hours[HOURS - 1].start, at(TEN));
        assert_eq!((stats.succeeded(), stats.failed()), (0, 0));
    }

    #[test]
    fn percentiles_are_within_ten_percent() {
        let mut history = AttemptHistory::default();
        // 1..=1000 ms, once each: the median is 500 ms, the 95th percentile 950 ms.
        for ms in 1..=1000 {
            history.record(at(TEN + 1), true, MS(ms));
        }
        let hour = &history.stats(at(TEN + 2), at(TEN)).hours[HOURS - 1];
        let p50 = hour.latency_p50_ms.unwrap();
        let p95 = hour.latency_p95_ms.unwrap();
        assert!((p50 - 500.0).abs() <= 50.0, "{p50}");
        assert!((p95 - 950.0).abs() <= 95.0, "{p95}");
        assert!(p50 < p95);
        // Sub-millisecond and very long attempts stay within what was seen.
        let mut history = AttemptHistory::default();
        history.record(at(TEN), true, Duration::from_micros(300));
        history.record(at(TEN), true, Duration::from_micros(500));
        history.record(at(TEN), true, Duration::from_secs(100));
        let hour = &history.stats(at(TEN), at(TEN)).hours[HOURS - 1];
        let p50 = hour.latency_p50_ms.unwrap();
        assert!((0.3..1.2).contains(&p50), "{p50}");
        let p95 = hour.latency_p95_ms.unwrap();
        assert!((55_000.0..=100_000.0).contains(&p95), "{p95}");
    }

    #[test]
    fn latency_buckets_cover_every_duration() {
        assert_eq!(bucket_of(0.0), 0);
        assert_eq!(bucket_of(0.99), 0);
        assert_eq!(bucket_of(1.0), 0);
        assert_eq!(bucket_of(2.0), 4);
        assert_eq!(bucket_of(1e9), LATENCY_BUCKETS - 1);
        for ms in [1.5, 3.0, 17.0, 250.0, 9_999.0, 60_000.0] {
            let (lower, upper) = bucket_bounds(bucket_of(ms));
            assert!(lower <= ms && ms < upper, "{ms} in [{lower}, {upper})");
            assert!(upper / lower.max(1.0) <= 1.19 + 1e-9);
        }
    }

    #[test]
    fn stats_cross_between_replicas_unchanged() {
        let mut history = AttemptHistory::default();
        history.record(at(TEN), true, MS(12));
        history.record(at(TEN), false, MS(3));
        let stats = history.stats(at(TEN + 10), at(TEN - 10));
        let wire = serde_json::to_string(&stats).unwrap();
        assert_eq!(serde_json::from_str::<AttemptStats>(&wire).unwrap(), stats);
    }
}
