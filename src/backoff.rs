//! The one backoff of the operator's retries against the API server: a reconcile that failed, a
//! delivery-log write that failed, a start waiting for the CRD. Doubling from a first delay up to
//! a cap; callers choose the two.

use std::time::Duration;

/// Delay before retrying after `failures` consecutive failures: `first`, doubling, at most `max`.
pub fn doubling(failures: u32, first: Duration, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    first.saturating_mul(1u32 << exp).min(max)
}

/// Delay of a failed reconcile after `failures` consecutive failures: 1 s doubling to 5 min.
pub fn retry_delay(failures: u32) -> Duration {
    doubling(failures, Duration::from_secs(1), Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_caps() {
        assert_eq!(retry_delay(1), Duration::from_secs(1));
        assert_eq!(retry_delay(2), Duration::from_secs(2));
        assert_eq!(retry_delay(5), Duration::from_secs(16));
        assert_eq!(retry_delay(9), Duration::from_secs(256));
        assert_eq!(retry_delay(10), Duration::from_secs(300));
        assert_eq!(retry_delay(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn doubling_starts_at_first_and_stops_at_max() {
        let (first, max) = (Duration::from_millis(500), Duration::from_secs(30));
        assert_eq!(doubling(0, first, max), first);
        assert_eq!(doubling(1, first, max), first);
        assert_eq!(doubling(2, first, max), Duration::from_secs(1));
        assert_eq!(doubling(7, first, max), Duration::from_secs(30));
        assert_eq!(doubling(u32::MAX, first, max), max);
        assert_eq!(doubling(u32::MAX, Duration::MAX, Duration::MAX), Duration::MAX);
    }
}
