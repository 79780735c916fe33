//! What one delivery attempt's result means for the delivery and the endpoint.
//!
//! The rule: 2xx is success; 410 Gone means the receiver wants no more deliveries,
//! so the endpoint is disabled; every other status, a timeout or a connection error is a
//! failure that is retried; an address refused by the SSRF guard is final, since retrying
//! cannot make it allowed.

use std::time::Duration;

use jiff::Timestamp;

use crate::delivery::health::{HealthWindow, should_auto_disable};
use crate::delivery::schedule::{RetrySchedule, next_attempt_delay};
use crate::resources::DeliverySummary;

/// The result of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The receiver answered 2xx.
    Success {
        /// The HTTP status.
        status: u16,
    },
    /// The receiver answered with a status that is neither 2xx nor 410.
    HttpFailure {
        /// The HTTP status.
        status: u16,
        /// The receiver's `Retry-After`, kept only for 429 and 503.
        retry_after: Option<Duration>,
    },
    /// The receiver answered 410 Gone: stop delivering and disable the endpoint.
    Gone,
    /// No complete response within the timeout.
    Timeout,
    /// The connection failed (refused, reset, TLS error, DNS failure...); the text says how.
    ConnectError(String),
    /// The SSRF guard refused every address of the target; the text says why.
    Refused(String),
}

impl AttemptOutcome {
    /// The HTTP status, when the receiver answered at all.
    pub fn status(&self) -> Option<u16> {
        match self {
            AttemptOutcome::Success { status } | AttemptOutcome::HttpFailure { status, .. } => Some(*status),
            AttemptOutcome::Gone => Some(410),
            AttemptOutcome::Timeout | AttemptOutcome::ConnectError(_) | AttemptOutcome::Refused(_) => None,
        }
    }

    /// Whether the attempt succeeded; everything else counts as a failure for health.
    pub fn is_success(&self) -> bool {
        matches!(self, AttemptOutcome::Success { .. })
    }

    /// The `result` label of `capy_webhooks_delivery_attempts_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AttemptOutcome::Success { .. } => "success",
            AttemptOutcome::HttpFailure { .. } => "http_error",
            AttemptOutcome::Gone => "gone",
            AttemptOutcome::Timeout => "timeout",
            AttemptOutcome::ConnectError(_) => "connect_error",
            AttemptOutcome::Refused(_) => "refused",
        }
    }

    /// The `Retry-After` to honour when scheduling the next attempt.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AttemptOutcome::HttpFailure { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Classifies a response by its status and parsed `Retry-After`.
///
/// 2xx is [`Success`](AttemptOutcome::Success), 410 is [`Gone`](AttemptOutcome::Gone), anything
/// else (1xx, 3xx — redirects are not followed —, 4xx, 5xx) is an
/// [`HttpFailure`](AttemptOutcome::HttpFailure). `Retry-After` is kept only on 429 Too Many
/// Requests and 503 Service Unavailable, the two statuses where it means "come back later";
/// elsewhere it is dropped so a receiver cannot stretch retries with an arbitrary header.
pub fn classify(status: u16, retry_after: Option<Duration>) -> AttemptOutcome {
    match status {
        200..=299 => AttemptOutcome::Success { status },
        410 => AttemptOutcome::Gone,
        429 | 503 => AttemptOutcome::HttpFailure { status, retry_after },
        _ => AttemptOutcome::HttpFailure {
            status,
            retry_after: None,
        },
    }
}

/// Whether the delivery should be attempted again (if attempts remain).
///
/// Everything retries except [`Success`](AttemptOutcome::Success) (done),
/// [`Gone`](AttemptOutcome::Gone) (the receiver said stop) and
/// [`Refused`](AttemptOutcome::Refused) (the target is not allowed; a retry would be refused
/// again — a change of DNS or policy shows up on the next event's delivery).
pub fn is_retryable(outcome: &AttemptOutcome) -> bool {
    match outcome {
        AttemptOutcome::Success { .. } | AttemptOutcome::Gone | AttemptOutcome::Refused(_) => false,
        AttemptOutcome::HttpFailure { .. } | AttemptOutcome::Timeout | AttemptOutcome::ConnectError(_) => true,
    }
}

/// Where a delivery goes after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Delivered: the delivery is `succeeded`.
    Succeeded,
    /// Still `pending`: attempt again at this time.
    RetryAt(Timestamp),
    /// No attempt left, or none worth making: the delivery is `failed`.
    Failed,
}

/// What one attempt's outcome does to its delivery and its endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptEffect {
    /// The delivery's next step.
    pub next: NextStep,
    /// The delivery's `last_error`: `None` after a success.
    pub last_error: Option<String>,
    /// Why the endpoint should be disabled, when the receiver asked for it (410 Gone).
    pub disable: Option<String>,
}

/// Decides what an attempt's outcome does to a delivery that has now had `attempts_made`
/// attempts (this one included) out of `max_attempts`. `jitter_unit` is uniform in `[0, 1)`
/// (see [`crate::delivery::schedule::apply_jitter`]). Pure: the worker applies the effect.
pub fn after_attempt(
    outcome: &AttemptOutcome,
    response_excerpt: Option<&str>,
    attempts_made: u32,
    max_attempts: u32,
    schedule: &RetrySchedule,
    at: Timestamp,
    jitter_unit: f64,
) -> AttemptEffect {
    if outcome.is_success() {
        return AttemptEffect {
            next: NextStep::Succeeded,
            last_error: None,
            disable: None,
        };
    }
    let delay = is_retryable(outcome)
        .then(|| {
            next_attempt_delay(
                schedule,
                attempts_made,
                Some(max_attempts),
                outcome.retry_after(),
                jitter_unit,
            )
        })
        .flatten();
    AttemptEffect {
        next: match delay {
            Some(delay) => NextStep::RetryAt(at.checked_add(delay).unwrap_or(at)),
            None => NextStep::Failed,
        },
        last_error: Some(describe_failure(outcome, response_excerpt)),
        disable: matches!(outcome, AttemptOutcome::Gone).then(|| "the receiver answered 410 Gone".to_string()),
    }
}

/// What one attempt does to its endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointEffect {
    /// The endpoint's delivery totals once the attempt is counted (`pending` is left as it was:
    /// the log counts it).
    pub totals: DeliverySummary,
    /// Why the endpoint is disabled now, when it is.
    pub disable: Option<String>,
}

/// Decides what an attempt whose delivery got `effect` (from [`after_attempt`]) does to its
/// endpoint, which `active` says is still active.
///
/// Every attempt moves the failure streak and the time of the last success or failure; a
/// delivery counts as succeeded or failed once, when it finishes. The endpoint is disabled when
/// the receiver asked for it (410 Gone) or, after a failure, when every attempt failed for
/// `auto_disable_after` ([`should_auto_disable`]; `window` already holds this attempt). One
/// that is no longer active is not disabled again. Pure: the worker applies the effect.
pub fn endpoint_after_attempt(
    effect: &AttemptEffect,
    totals: &DeliverySummary,
    window: &HealthWindow,
    at: Timestamp,
    auto_disable_after: Duration,
    active: bool,
) -> EndpointEffect {
    let mut totals = totals.clone();
    let time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at));
    let success = effect.next == NextStep::Succeeded;
    if success {
        totals.consecutive_failures = 0;
        totals.last_success_at = time;
    } else {
        totals.consecutive_failures += 1;
        totals.last_failure_at = time;
    }
    match effect.next {
        NextStep::Succeeded => totals.succeeded += 1,
        NextStep::RetryAt(_) => {}
        NextStep::Failed => totals.failed += 1,
    }
    let disable = effect.disable.clone().or_else(|| {
        (!success && should_auto_disable(window, at, auto_disable_after)).then(|| {
            let since = window
                .first_failure_of_current_streak()
                .map(|t| t.to_string())
                .unwrap_or_default();
            format!("every delivery attempt failed since {since}")
        })
    });
    EndpointEffect {
        totals,
        disable: disable.filter(|_| active),
    }
}

/// `last_error` text for a failed attempt: what happened, and the start of the response body.
pub fn describe_failure(outcome: &AttemptOutcome, response_excerpt: Option<&str>) -> String {
    let what = match outcome {
        AttemptOutcome::HttpFailure { status, .. } | AttemptOutcome::Success { status } => format!("HTTP {status}"),
        AttemptOutcome::Gone => "HTTP 410 Gone".to_string(),
        AttemptOutcome::Timeout => "timed out".to_string(),
        AttemptOutcome::ConnectError(e) => format!("connection failed: {e}"),
        AttemptOutcome::Refused(e) => format!("refused: {e}"),
    };
    match response_excerpt.filter(|s| !s.is_empty()) {
        Some(body) => format!("{what}: {body}"),
        None => what,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Option<Duration> = Some(Duration::from_secs(60));

    #[test]
    fn two_hundreds_succeed() {
        for status in [200, 201, 202, 204, 299] {
            assert_eq!(classify(status, None), AttemptOutcome::Success { status });
            // A Retry-After on a success means nothing.
            assert_eq!(classify(status, MINUTE), AttemptOutcome::Success { status });
            assert!(classify(status, None).is_success());
            assert!(!is_retryable(&classify(status, None)));
        }
    }

    #[test]
    fn metric_labels() {
        assert_eq!(classify(204, None).metric_label(), "success");
        assert_eq!(classify(500, None).metric_label(), "http_error");
        assert_eq!(classify(410, None).metric_label(), "gone");
        assert_eq!(AttemptOutcome::Timeout.metric_label(), "timeout");
        assert_eq!(
            AttemptOutcome::ConnectError("reset".into()).metric_label(),
            "connect_error"
        );
        assert_eq!(AttemptOutcome::Refused("loopback".into()).metric_label(), "refused");
    }

    #[test]
    fn gone_disables_and_does_not_retry() {
        assert_eq!(classify(410, None), AttemptOutcome::Gone);
        assert_eq!(classify(410, MINUTE), AttemptOutcome::Gone);
        assert!(!is_retryable(&AttemptOutcome::Gone));
        assert!(!AttemptOutcome::Gone.is_success());
        assert_eq!(AttemptOutcome::Gone.status(), Some(410));
    }

    #[test]
    fn other_statuses_fail_and_retry() {
        for status in [
            100, 199, 300, 301, 302, 304, 400, 401, 403, 404, 409, 411, 418, 500, 502, 504, 599, 0, 999,
        ] {
            let outcome = classify(status, None);
            assert_eq!(
                outcome,
                AttemptOutcome::HttpFailure {
                    status,
                    retry_after: None
                },
                "{status}"
            );
            assert!(is_retryable(&outcome), "{status}");
            assert!(!outcome.is_success());
            assert_eq!(outcome.status(), Some(status));
        }
    }

    #[test]
    fn retry_after_is_kept_only_on_429_and_503() {
        for status in [429, 503] {
            let outcome = classify(status, MINUTE);
            assert_eq!(
                outcome,
                AttemptOutcome::HttpFailure {
                    status,
                    retry_after: MINUTE
                }
            );
            assert_eq!(outcome.retry_after(), MINUTE);
            assert_eq!(classify(status, None).retry_after(), None);
        }
        for status in [400, 404, 408, 500, 502, 504, 301] {
            let outcome = classify(status, MINUTE);
            assert_eq!(
                outcome,
                AttemptOutcome::HttpFailure {
                    status,
                    retry_after: None
                },
                "{status}"
            );
            assert_eq!(outcome.retry_after(), None);
        }
        assert_eq!(classify(200, MINUTE).retry_after(), None);
    }

    #[test]
    fn transport_failures_retry_but_refusals_do_not() {
        assert!(is_retryable(&AttemptOutcome::Timeout));
        assert!(is_retryable(&AttemptOutcome::ConnectError("connection refused".into())));
        assert!(!is_retryable(&AttemptOutcome::Refused("loopback".into())));
        for outcome in [
            AttemptOutcome::Timeout,
            AttemptOutcome::ConnectError("reset".into()),
            AttemptOutcome::Refused("private".into()),
        ] {
            assert!(!outcome.is_success());
            assert_eq!(outcome.status(), None);
            assert_eq!(outcome.retry_after(), None);
        }
    }

    mod after_attempt {
        use super::super::*;

        fn schedule() -> RetrySchedule {
            "0s,10s,1m".parse().unwrap()
        }

        fn at() -> Timestamp {
            Timestamp::from_second(1_000_000).unwrap()
        }

        fn effect(outcome: AttemptOutcome, attempts_made: u32) -> AttemptEffect {
            after_attempt(&outcome, Some("oops"), attempts_made, 3, &schedule(), at(), 0.5)
        }

        fn retry_in(seconds: i64) -> NextStep {
            NextStep::RetryAt(at().checked_add(jiff::SignedDuration::from_secs(seconds)).unwrap())
        }

        #[test]
        fn success_clears_the_error_whatever_came_before() {
            let done = effect(AttemptOutcome::Success { status: 204 }, 3);
            assert_eq!(
                done,
                AttemptEffect {
                    next: NextStep::Succeeded,
                    last_error: None,
                    disable: None
                }
            );
        }

        #[test]
        fn retryable_failures_follow_the_schedule_then_fail() {
            for outcome in [
                AttemptOutcome::HttpFailure {
                    status: 500,
                    retry_after: None,
                },
                AttemptOutcome::HttpFailure {
                    status: 400,
                    retry_after: None,
                },
                AttemptOutcome::Timeout,
                AttemptOutcome::ConnectError("connection refused".into()),
            ] {
                assert_eq!(effect(outcome.clone(), 1).next, retry_in(10), "{outcome:?}");
                assert_eq!(effect(outcome.clone(), 2).next, retry_in(60), "{outcome:?}");
                let last = effect(outcome.clone(), 3);
                assert_eq!(last.next, NextStep::Failed, "{outcome:?}");
                assert!(last.last_error.is_some() && last.disable.is_none());
            }
        }

        #[test]
        fn retry_after_stretches_the_wait_on_429_and_503() {
            let slow_down = AttemptOutcome::HttpFailure {
                status: 429,
                retry_after: Some(std::time::Duration::from_secs(300)),
            };
            assert_eq!(effect(slow_down, 1).next, retry_in(300));
        }

        #[test]
        fn gone_fails_at_once_and_disables_the_endpoint() {
            let gone = effect(AttemptOutcome::Gone, 1);
            assert_eq!(gone.next, NextStep::Failed);
            assert_eq!(gone.last_error.as_deref(), Some("HTTP 410 Gone: oops"));
            assert_eq!(gone.disable.as_deref(), Some("the receiver answered 410 Gone"));
        }

        #[test]
        fn a_refused_target_fails_at_once_without_disabling() {
            let refused = effect(
                AttemptOutcome::Refused("loopback address is not an allowed webhook target".into()),
                1,
            );
            assert_eq!(refused.next, NextStep::Failed);
            assert_eq!(refused.disable, None);
            assert!(refused.last_error.unwrap().starts_with("refused: loopback address"));
        }

        #[test]
        fn errors_carry_the_response_excerpt_when_there_is_one() {
            let failure = AttemptOutcome::HttpFailure {
                status: 502,
                retry_after: None,
            };
            assert_eq!(describe_failure(&failure, Some("bad gateway")), "HTTP 502: bad gateway");
            assert_eq!(describe_failure(&failure, Some("")), "HTTP 502");
            assert_eq!(describe_failure(&AttemptOutcome::Timeout, None), "timed out");
        }
    }

    mod endpoint_after_attempt {
        use super::super::*;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

        const DAY: i64 = 86_400;
        const FIVE_DAYS: Duration = Duration::from_secs(5 * 86_400);

        fn at(s: i64) -> Timestamp {
            Timestamp::from_second(1_700_000_000 + s).unwrap()
        }

        fn effect(next: NextStep, disable: Option<&str>) -> AttemptEffect {
            AttemptEffect {
                next,
                last_error: (next != NextStep::Succeeded).then(|| "HTTP 500".to_string()),
                disable: disable.map(str::to_string),
            }
        }

        /// A window whose failure streak began at `since` and runs to `now` (a success before it).
        fn failing_since(since: i64, now: i64) -> HealthWindow {
            let mut window = HealthWindow::default();
            window.record(at(since - 1), true);
            window.record(at(since), false);
            window.record(at(now), false);
            window
        }

        fn totals() -> DeliverySummary {
            DeliverySummary {
                succeeded: 3,
                failed: 2,
                pending: 7,
                consecutive_failures: 4,
                last_success_at: Some(Time(at(-100))),
                last_failure_at: Some(Time(at(-50))),
            }
        }

        #[test]
        fn totals_count_attempts_and_finished_deliveries() {
            let now = at(0);
            let retry = NextStep::RetryAt(at(60));
            // next step => (succeeded, failed, consecutive failures, last success, last failure)
            let table = [
                (NextStep::Succeeded, (4, 2, 0, Some(now), Some(at(-50)))),
                (retry, (3, 2, 5, Some(at(-100)), Some(now))),
                (NextStep::Failed, (3, 3, 5, Some(at(-100)), Some(now))),
            ];
            let mut window = HealthWindow::default();
            window.record(now, false);
            for (next, (succeeded, failed, streak, success_at, failure_at)) in table {
                let done = endpoint_after_attempt(&effect(next, None), &totals(), &window, now, FIVE_DAYS, true);
                let got = done.totals;
                assert_eq!(got.succeeded, succeeded, "{next:?}");
                assert_eq!(got.failed, failed, "{next:?}");
                assert_eq!(got.consecutive_failures, streak, "{next:?}");
                assert_eq!(got.last_success_at.map(|t| t.0), success_at, "{next:?}");
                assert_eq!(got.last_failure_at.map(|t| t.0), failure_at, "{next:?}");
                assert_eq!(got.pending, 7, "pending is the log's to count");
                assert_eq!(done.disable, None, "{next:?}");
            }
        }

        #[test]
        fn when_the_endpoint_is_disabled() {
            let gone = Some("the receiver answered 410 Gone");
            let retry = NextStep::RetryAt(at(6 * DAY + 60));
            let streak = format!("every delivery attempt failed since {}", at(0));
            // (next step, receiver asked, streak began (s), active) => reason
            #[allow(clippy::type_complexity)]
            let table: [((NextStep, Option<&str>, i64, bool), Option<&str>); 8] = [
                // The receiver said stop.
                ((NextStep::Failed, gone, 6 * DAY, true), gone),
                // Failing for the whole window, retried or given up.
                ((retry, None, 0, true), Some(&streak)),
                ((NextStep::Failed, None, 0, true), Some(&streak)),
                // The receiver's reason comes first.
                ((NextStep::Failed, gone, 0, true), gone),
                // Not failing long enough.
                ((retry, None, 2 * DAY, true), None),
                ((NextStep::Failed, None, 5 * DAY + 1, true), None),
                // Already inactive (or deleted): not disabled again.
                ((NextStep::Failed, gone, 0, false), None),
                ((retry, None, 0, false), None),
            ];
            let now = 6 * DAY;
            for ((next, asked, since, active), want) in table {
                let window = failing_since(since, now);
                let done = endpoint_after_attempt(&effect(next, asked), &totals(), &window, at(now), FIVE_DAYS, active);
                assert_eq!(done.disable.as_deref(), want, "{next:?} {asked:?} {since} {active}");
            }
        }

        #[test]
        fn a_success_never_disables() {
            let mut window = failing_since(0, 6 * DAY);
            window.record(at(6 * DAY), true);
            let done = endpoint_after_attempt(
                &effect(NextStep::Succeeded, None),
                &totals(),
                &window,
                at(6 * DAY),
                FIVE_DAYS,
                true,
            );
            assert_eq!(done.disable, None);
        }
    }
}
