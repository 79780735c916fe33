//! The retry schedule: how long to wait before each attempt of a delivery.
//!
//! The schedule is a list of delays, one per attempt, each measured from the previous attempt
//! (the first from the moment the event was accepted, so it is usually 0). The default is in the
//! spirit of Svix's: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h — about 28 hours of
//! retries in all, long enough to ride out a receiver's bad day.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use jiff::Timestamp;

use crate::duration::{format_duration, parse_duration};

/// The longest single delay a schedule may hold. A longer one is almost certainly a typo
/// (`30h` meant as `30m` is fine, `300h` is not), and deliveries should not sit unattempted for
/// longer than a week.
pub const MAX_SCHEDULE_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);

/// The longest `Retry-After` honoured. A receiver may slow us down, but not park a delivery
/// indefinitely (or overflow a timer) with a huge value.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The default schedule, in the syntax [`RetrySchedule::from_str`] parses.
pub const DEFAULT_SCHEDULE: &str = "0s,5s,5m,30m,2h,5h,10h,10h";

/// Delays before attempt 1, 2, ...; its length is the default number of attempts.
///
/// Built with [`FromStr`] (`"0s,5s,5m,30m,2h,5h,10h,10h"`), [`RetrySchedule::new`] or
/// [`Default`]; all of them check that it is non-empty and that no delay exceeds
/// [`MAX_SCHEDULE_DELAY`]. [`Display`](fmt::Display) writes it back in the parseable syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule(Vec<Duration>);

/// Why a retry schedule was refused. Items are numbered from 1, as a user counts them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// No delay at all: a delivery would never be attempted.
    #[error("the retry schedule is empty; give at least one delay, e.g. \"0s\"")]
    Empty,
    /// One item does not parse.
    #[error("retry schedule item {position} ({item:?}) is invalid: {reason}")]
    InvalidItem {
        /// 1-based position in the list.
        position: usize,
        /// The item as written.
        item: String,
        /// What is wrong with it.
        reason: String,
    },
    /// One delay is longer than [`MAX_SCHEDULE_DELAY`].
    #[error("retry schedule item {position} ({item}) is longer than the maximum of 7 days")]
    TooLong {
        /// 1-based position in the list.
        position: usize,
        /// The delay, in the schedule syntax.
        item: String,
    },
}

impl RetrySchedule {
    /// A schedule from explicit delays, with the same checks as parsing.
    pub fn new(delays: Vec<Duration>) -> Result<Self, ScheduleError> {
        if delays.is_empty() {
            return Err(ScheduleError::Empty);
        }
        for (i, delay) in delays.iter().enumerate() {
            if *delay > MAX_SCHEDULE_DELAY {
                return Err(ScheduleError::TooLong {
                    position: i + 1,
                    item: format_duration(*delay),
                });
            }
        }
        Ok(RetrySchedule(delays))
    }

    /// The delays, before attempt 1, 2, ...
    pub fn delays(&self) -> &[Duration] {
        &self.0
    }

    /// The number of attempts this schedule allows: one per entry.
    pub fn max_attempts(&self) -> u32 {
        u32::try_from(self.0.len()).unwrap_or(u32::MAX)
    }

    /// The un-jittered delay before the attempt that follows `attempts_made` attempts.
    ///
    /// Past the end of the schedule the last delay repeats, so an endpoint allowed more attempts
    /// than the schedule lists keeps retrying at the slowest pace rather than hammering.
    pub fn scheduled_delay(&self, attempts_made: u32) -> Duration {
        let index = usize::try_from(attempts_made)
            .unwrap_or(usize::MAX)
            .min(self.0.len() - 1);
        self.0[index]
    }
}

impl Default for RetrySchedule {
    /// `0s,5s,5m,30m,2h,5h,10h,10h` ([`DEFAULT_SCHEDULE`]).
    fn default() -> Self {
        DEFAULT_SCHEDULE.parse().expect("the default schedule parses")
    }
}

impl FromStr for RetrySchedule {
    type Err = ScheduleError;

    /// Parses comma-separated delays such as `0s,5s,5m,30m,2h`: each a non-negative integer
    /// followed by one of the units `ms`, `s`, `m`, `h`; spaces around items are ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err(ScheduleError::Empty);
        }
        let delays = s
            .split(',')
            .enumerate()
            .map(|(i, item)| {
                parse_duration(item.trim()).map_err(|reason| ScheduleError::InvalidItem {
                    position: i + 1,
                    item: item.trim().to_string(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        RetrySchedule::new(delays)
    }
}

impl fmt::Display for RetrySchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self.0.iter().map(|d| format_duration(*d)).collect();
        f.write_str(&items.join(","))
    }
}

/// Spreads `delay` by up to ±20 % so that deliveries that failed together (an endpoint outage)
/// do not all retry at the same instant.
///
/// `jitter_unit` is a uniform random number in `[0, 1)` supplied by the caller (this module reads
/// no randomness, so it stays deterministic under test): 0.0 gives −20 %, 0.5 the delay itself,
/// values towards 1.0 up to +20 %. Values outside `[0, 1]` are clamped and a NaN counts as 0.5.
/// A zero delay stays zero: "immediately" must not become "soon".
pub fn apply_jitter(delay: Duration, jitter_unit: f64) -> Duration {
    let unit = if jitter_unit.is_nan() {
        0.5
    } else {
        jitter_unit.clamp(0.0, 1.0)
    };
    // Integer nanoseconds so the ±20 % bound holds exactly, without float rounding at the edges.
    let nanos = delay.as_nanos() as i128;
    let max_offset = nanos / 5;
    let offset = (((2.0 * unit - 1.0) * max_offset as f64).round() as i128).clamp(-max_offset, max_offset);
    let total = (nanos + offset) as u128;
    Duration::new((total / 1_000_000_000) as u64, (total % 1_000_000_000) as u32)
}

/// How long to wait before the next attempt of a delivery, or `None` to give up.
///
/// - `attempts_made`: attempts already made (0 before the first).
/// - `max_attempts_override`: the endpoint's `maxAttempts`, if set; otherwise the schedule's
///   length is the limit. When it exceeds the schedule's length, the last delay repeats.
/// - `retry_after`: the `Retry-After` of the last response, which the caller passes only for
///   429 and 503 (see [`crate::delivery::outcome::classify`]).
/// - `jitter_unit`: uniform random in `[0, 1)`, see [`apply_jitter`].
///
/// The result is the scheduled delay with jitter; with a `Retry-After`, the longer of that and
/// the `Retry-After` capped at [`MAX_RETRY_AFTER`] (the cap bounds what a receiver can ask for,
/// not the operator's own schedule).
pub fn next_attempt_delay(
    schedule: &RetrySchedule,
    attempts_made: u32,
    max_attempts_override: Option<u32>,
    retry_after: Option<Duration>,
    jitter_unit: f64,
) -> Option<Duration> {
    let max_attempts = max_attempts_override.unwrap_or_else(|| schedule.max_attempts());
    if attempts_made >= max_attempts {
        return None;
    }
    let jittered = apply_jitter(schedule.scheduled_delay(attempts_made), jitter_unit);
    Some(match retry_after {
        Some(asked) => jittered.max(asked.min(MAX_RETRY_AFTER)),
        None => jittered,
    })
}

/// When the attempt after one started at `now` may start, for an endpoint limited to `rate`
/// deliveries per second: one interval of `1/rate` after the later of `now` and the previous
/// slot. Spacing, not a bucket, so a backlog is never sent as a burst; an idle endpoint starts at
/// once because `now` is past its slot.
pub fn paced(previous_slot: Timestamp, now: Timestamp, rate: u32) -> Timestamp {
    let interval = jiff::SignedDuration::from_nanos(1_000_000_000 / i64::from(rate.max(1)));
    previous_slot.max(now).checked_add(interval).unwrap_or(Timestamp::MAX)
}

/// Parses a `Retry-After` header value (RFC 9110 §10.2.3) into a delay from `now`.
///
/// Accepts delta-seconds (`120`) and an HTTP-date: the IMF-fixdate form
/// (`Wed, 21 Oct 2015 07:28:00 GMT`) plus the two obsolete forms recipients must still accept
/// (RFC 850 `Wednesday, 21-Oct-15 07:28:00 GMT` and asctime `Wed Oct 21 07:28:00 2015`).
/// A date in the past gives `Some(0)`: the receiver is ready now. Anything else (empty,
/// negative, fractional, garbage) gives `None`, and the schedule alone applies.
pub fn parse_retry_after(value: &str, now: Timestamp) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits to fit is still a valid "very long"; the caller's cap bounds it.
        return Some(value.parse().map(Duration::from_secs).unwrap_or(Duration::MAX));
    }
    let at = parse_http_date(value)?;
    Some(Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO))
}

/// An HTTP-date in any of its three forms (IMF-fixdate, RFC 850, asctime), always GMT, read by
/// the `httpdate` crate (already in the tree through hyper). A weekday that contradicts the date
/// means a malformed header, not a date to guess at: the date is written back and compared.
fn parse_http_date(value: &str) -> Option<Timestamp> {
    let at = httpdate::parse_http_date(value).ok()?;
    let weekday_of = |text: &str| text.get(..3).map(str::to_ascii_lowercase);
    let canonical = httpdate::fmt_http_date(at);
    if weekday_of(value) != weekday_of(&canonical) {
        return None;
    }
    Timestamp::try_from(at).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn default_schedule_is_the_documented_list() {
        let schedule = RetrySchedule::default();
        assert_eq!(schedule, DEFAULT_SCHEDULE.parse().unwrap());
        assert_eq!(
            schedule.delays(),
            &[
                secs(0),
                secs(5),
                secs(300),
                secs(1800),
                secs(7200),
                secs(18000),
                secs(36000),
                secs(36000)
            ]
        );
        assert_eq!(schedule.max_attempts(), 8);
        assert_eq!(schedule.to_string(), DEFAULT_SCHEDULE);
    }

    #[test]
    fn parses_every_unit_and_spaces() {
        let schedule: RetrySchedule = " 250ms, 1s ,2m,3h ".parse().unwrap();
        assert_eq!(
            schedule.delays(),
            &[Duration::from_millis(250), secs(1), secs(120), secs(3 * 3600)]
        );
        assert_eq!(schedule.to_string(), "250ms,1s,2m,3h");
        // Display picks the largest exact unit, so it round-trips.
        let odd: RetrySchedule = "90s,1500ms,120m,0ms".parse().unwrap();
        assert_eq!(odd.to_string(), "90s,1500ms,2h,0s");
        assert_eq!(odd.to_string().parse::<RetrySchedule>().unwrap(), odd);
    }

    #[test]
    fn seven_days_is_the_inclusive_limit() {
        assert_eq!("168h".parse::<RetrySchedule>().unwrap().delays(), &[MAX_SCHEDULE_DELAY]);
        assert_eq!(
            "10080m".parse::<RetrySchedule>().unwrap().delays(),
            &[MAX_SCHEDULE_DELAY]
        );
        let err = "0s,168h,169h".parse::<RetrySchedule>().unwrap_err();
        assert_eq!(
            err,
            ScheduleError::TooLong {
                position: 3,
                item: "169h".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "retry schedule item 3 (169h) is longer than the maximum of 7 days"
        );
        assert!(RetrySchedule::new(vec![MAX_SCHEDULE_DELAY + Duration::from_millis(1)]).is_err());
    }

    #[test]
    fn items_use_the_one_duration_grammar() {
        let schedule: RetrySchedule = "0s,1m30s,1d,500ms".parse().unwrap();
        assert_eq!(
            schedule.delays(),
            &[secs(0), secs(90), secs(86_400), Duration::from_millis(500)]
        );
        assert_eq!(schedule.to_string(), "0s,90s,1d,500ms");
    }

    #[test]
    fn parse_errors_name_the_bad_item() {
        let cases = [
            ("0s,5x", 2, "5x", "unknown unit"),
            ("5", 1, "5", "no unit"),
            ("0s,,5s", 2, "", "empty"),
            ("0s,5s,", 3, "", "empty"),
            ("s", 1, "s", "whole number"),
            ("-5s", 1, "-5s", "whole number"),
            ("1.5h", 1, "1.5h", "unknown unit"),
            ("5 s", 1, "5 s", "unknown unit"),
            ("5S", 1, "5S", "unknown unit"),
            ("99999999999999999999s", 1, "99999999999999999999s", "too large"),
            ("18446744073709551615h", 1, "18446744073709551615h", "too large"),
        ];
        for (input, position, item, reason) in cases {
            let err = input.parse::<RetrySchedule>().unwrap_err();
            match &err {
                ScheduleError::InvalidItem {
                    position: p,
                    item: i,
                    reason: r,
                } => {
                    assert_eq!((*p, i.as_str()), (position, item), "{input}");
                    assert!(r.contains(reason), "{input}: {r}");
                }
                other => panic!("{input}: unexpected {other:?}"),
            }
            assert!(err.to_string().contains(&format!("item {position}")), "{err}");
        }
        assert_eq!("".parse::<RetrySchedule>().unwrap_err(), ScheduleError::Empty);
        assert_eq!("  ".parse::<RetrySchedule>().unwrap_err(), ScheduleError::Empty);
        assert_eq!(RetrySchedule::new(vec![]).unwrap_err(), ScheduleError::Empty);
        assert_eq!(
            "0s,5x".parse::<RetrySchedule>().unwrap_err().to_string(),
            "retry schedule item 2 (\"5x\") is invalid: unknown unit \"x\"; use d, h, m, s or ms"
        );
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        for delay in [
            secs(5),
            secs(300),
            secs(36000),
            Duration::from_millis(7),
            MAX_SCHEDULE_DELAY,
        ] {
            let nanos = delay.as_nanos();
            let (low, high) = (nanos - nanos / 5, nanos + nanos / 5);
            for i in 0..10_000 {
                let unit = f64::from(i) / 10_000.0;
                let jittered = apply_jitter(delay, unit).as_nanos();
                assert!((low..=high).contains(&jittered), "{delay:?} unit {unit}: {jittered}");
            }
            assert_eq!(apply_jitter(delay, 0.0).as_nanos(), low);
            assert_eq!(apply_jitter(delay, 0.5), delay);
            assert_eq!(apply_jitter(delay, 1.0).as_nanos(), high);
            let almost_one = apply_jitter(delay, 0.999_999).as_nanos();
            assert!(almost_one <= high && almost_one >= high - high / 100_000, "{delay:?}");
        }
        // Jitter spreads: the extremes differ.
        assert!(apply_jitter(secs(300), 0.1) < apply_jitter(secs(300), 0.9));
    }

    #[test]
    fn jitter_edge_inputs() {
        for unit in [0.0, 0.3, 0.999, -1.0, 2.0, f64::NAN, f64::INFINITY] {
            assert_eq!(apply_jitter(Duration::ZERO, unit), Duration::ZERO);
        }
        assert_eq!(apply_jitter(secs(10), -3.0), secs(8));
        assert_eq!(apply_jitter(secs(10), 7.0), secs(12));
        assert_eq!(apply_jitter(secs(10), f64::NAN), secs(10));
        assert_eq!(apply_jitter(secs(10), f64::NEG_INFINITY), secs(8));
    }

    #[test]
    fn follows_the_schedule_then_gives_up() {
        let schedule = RetrySchedule::default();
        let expected: Vec<Option<Duration>> = schedule
            .delays()
            .iter()
            .copied()
            .map(Some)
            .chain([None, None])
            .collect();
        let got: Vec<Option<Duration>> = (0..10)
            .map(|made| next_attempt_delay(&schedule, made, None, None, 0.5))
            .collect();
        assert_eq!(got, expected);
        assert_eq!(next_attempt_delay(&schedule, 0, None, None, 0.0), Some(Duration::ZERO));
        assert_eq!(next_attempt_delay(&schedule, u32::MAX, None, None, 0.5), None);
    }

    #[test]
    fn override_shorter_than_schedule_gives_up_early() {
        let schedule = RetrySchedule::default();
        assert_eq!(next_attempt_delay(&schedule, 2, Some(3), None, 0.5), Some(secs(300)));
        assert_eq!(next_attempt_delay(&schedule, 3, Some(3), None, 0.5), None);
        assert_eq!(
            next_attempt_delay(&schedule, 0, Some(1), None, 0.5),
            Some(Duration::ZERO)
        );
        assert_eq!(next_attempt_delay(&schedule, 1, Some(1), None, 0.5), None);
        // Zero attempts allowed (the CRD forbids it, but the function must not misbehave).
        assert_eq!(next_attempt_delay(&schedule, 0, Some(0), None, 0.5), None);
    }

    #[test]
    fn override_longer_than_schedule_repeats_the_last_delay() {
        let schedule: RetrySchedule = "0s,1m,10m".parse().unwrap();
        let got: Vec<Option<Duration>> = (0..7)
            .map(|made| next_attempt_delay(&schedule, made, Some(6), None, 0.5))
            .collect();
        assert_eq!(
            got,
            [
                Some(secs(0)),
                Some(secs(60)),
                Some(secs(600)),
                Some(secs(600)),
                Some(secs(600)),
                Some(secs(600)),
                None
            ]
        );
        assert_eq!(schedule.scheduled_delay(u32::MAX), secs(600));
        // The repeated delay is jittered too.
        assert_eq!(next_attempt_delay(&schedule, 4, Some(6), None, 0.0), Some(secs(480)));
    }

    #[test]
    fn retry_after_wins_when_longer_and_loses_when_shorter() {
        let schedule = RetrySchedule::default();
        // Before attempt 3 the schedule says 5 min.
        assert_eq!(
            next_attempt_delay(&schedule, 2, None, Some(secs(3600)), 0.5),
            Some(secs(3600))
        );
        assert_eq!(
            next_attempt_delay(&schedule, 2, None, Some(secs(10)), 0.5),
            Some(secs(300))
        );
        // Compared with the jittered delay: 240 s at the low end.
        assert_eq!(
            next_attempt_delay(&schedule, 2, None, Some(secs(250)), 0.0),
            Some(secs(250))
        );
        assert_eq!(
            next_attempt_delay(&schedule, 2, None, Some(secs(250)), 0.5),
            Some(secs(300))
        );
        // An "immediately" slot still waits what the receiver asked.
        assert_eq!(
            next_attempt_delay(&schedule, 0, None, Some(secs(30)), 0.5),
            Some(secs(30))
        );
        // Capped at 24 h...
        assert_eq!(
            next_attempt_delay(&schedule, 2, None, Some(secs(7 * 86400)), 0.5),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(
            next_attempt_delay(&schedule, 2, None, Some(Duration::MAX), 0.5),
            Some(MAX_RETRY_AFTER)
        );
        // ...but a Retry-After never extends the attempt budget.
        assert_eq!(next_attempt_delay(&schedule, 8, None, Some(secs(60)), 0.5), None);
    }

    #[test]
    fn the_retry_after_cap_does_not_shorten_the_operators_schedule() {
        let schedule: RetrySchedule = "0s,48h".parse().unwrap();
        assert_eq!(
            next_attempt_delay(&schedule, 1, None, Some(secs(60)), 0.5),
            Some(secs(48 * 3600))
        );
    }

    #[test]
    fn retry_after_delta_seconds() {
        let now = ts("2024-03-01T12:00:00Z");
        assert_eq!(parse_retry_after("120", now), Some(secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("99999999999999999999999", now), Some(Duration::MAX));
        for bad in ["", "  ", "-5", "1.5", "5s", "soon", "+5", "0x10"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_http_date() {
        let now = ts("2015-10-21T07:20:00Z");
        let eight_minutes = Some(secs(480));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now), eight_minutes);
        // Obsolete forms recipients must accept (RFC 9110 §5.6.7).
        assert_eq!(
            parse_retry_after("Wednesday, 21-Oct-15 07:28:00 GMT", now),
            eight_minutes
        );
        assert_eq!(parse_retry_after("Wed Oct 21 07:28:00 2015", now), eight_minutes);
        assert_eq!(
            parse_retry_after("Sun Nov  6 08:49:37 1994", ts("1994-11-06T08:49:00Z")),
            Some(secs(37))
        );
        // Sub-second "now" does not matter beyond the difference itself.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", ts("2015-10-21T07:27:59.5Z")),
            Some(Duration::from_millis(500))
        );
        // Past and present dates: retry now.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", ts("2015-10-21T07:28:00Z")),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", ts("2020-01-01T00:00:00Z")),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT", now),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn retry_after_bad_dates() {
        let now = ts("2015-10-21T07:20:00Z");
        for bad in [
            "Wed, 21 Oct 2015 07:28:00",     // no zone
            "Thu, 21 Oct 2015 07:28:00 GMT", // wrong weekday
            "Thursday, 21-Oct-15 07:28:00 GMT",
            "Thu Oct 21 07:28:00 2015",
            "Wed, 32 Oct 2015 07:28:00 GMT", // no such day
            "Wed, 21 Oct 2015 25:28:00 GMT", // no such hour
            "2015-10-21T07:28:00Z",          // not an HTTP-date
            "Wed, 21 Oct 2015",
        ] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn pacing_spaces_attempts_by_the_rate() {
        let t = |ms: i64| Timestamp::from_millisecond(1_700_000_000_000 + ms).unwrap();
        // An idle endpoint starts now; the next slot is one interval later.
        assert_eq!(paced(Timestamp::UNIX_EPOCH, t(0), 4), t(250));
        // A backlog: each slot follows the previous one, whatever the clock says.
        assert_eq!(paced(t(250), t(250), 4), t(500));
        assert_eq!(paced(t(500), t(260), 4), t(750));
        // After a pause, the next slot counts from now: no burst to catch up.
        assert_eq!(paced(t(750), t(5_000), 4), t(5_250));
        assert_eq!(paced(t(0), t(0), 1), t(1_000));
        assert_eq!(
            paced(t(0), t(0), 10_000),
            Timestamp::from_microsecond(1_700_000_000_000_100).unwrap()
        );
    }
}
