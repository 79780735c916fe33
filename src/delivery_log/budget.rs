//! The write budget: how many bytes per second the dispatcher may write through the API server.
//!
//! Every byte of the delivery log lands in the cluster's etcd, which keeps every version of every
//! object until the API server compacts it (every 5 minutes by default) and refuses every write in
//! the cluster once its quota is reached. The budget is a token bucket over those bytes:
//! - every write the dispatcher makes is charged when it is sent, whatever it is for, so the
//!   attempts of deliveries already accepted keep flowing (they may run the bucket into debt);
//! - new work (an event, a test, a retry) is admitted only while the bucket is not in debt, and
//!   is otherwise refused with the time the debt takes to be paid off (`Retry-After`).
//!
//! Over any long period the bytes written are at most `rate × time + burst` plus what the work
//! admitted before the bucket ran dry writes afterwards, which is bounded by the requests in
//! flight and the deliveries pending.
//!
//! Pure: the caller passes the clock in.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Seconds of budget the bucket saves up while idle: a burst after a quiet spell may write this
/// many seconds' worth at once.
pub const BURST_SECONDS: f64 = 10.0;
/// Longest `Retry-After` given to refused work, in seconds.
pub const MAX_RETRY_AFTER_SECS: u64 = 30;

/// A token bucket of bytes. `rate == 0` means no budget: everything is admitted.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    level: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket refilling at `bytes_per_second` (0: unlimited).
    pub fn new(bytes_per_second: u64, now: Instant) -> Self {
        let rate = bytes_per_second as f64;
        let burst = rate * BURST_SECONDS;
        Self {
            rate,
            burst,
            level: burst,
            updated: now,
        }
    }

    /// Bytes per second; 0 when unlimited.
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.rate).min(self.burst);
        self.updated = self.updated.max(now);
    }

    /// Takes `bytes` out of the bucket; it may go into debt.
    pub fn charge(&mut self, bytes: u64, now: Instant) {
        if self.rate == 0.0 {
            return;
        }
        self.refill(now);
        self.level -= bytes as f64;
    }

    /// Whether new work may start now; if not, how long until the debt is paid off (at least
    /// 1 s, at most `MAX_RETRY_AFTER_SECS`, in whole seconds as `Retry-After` counts).
    pub fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        if self.rate == 0.0 {
            return Ok(());
        }
        self.refill(now);
        if self.level >= 0.0 {
            return Ok(());
        }
        let secs = (-self.level / self.rate).ceil() as u64;
        Err(Duration::from_secs(secs.clamp(1, MAX_RETRY_AFTER_SECS)))
    }

    /// Bytes available now (negative: in debt).
    pub fn level(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.level
    }
}

/// A [`TokenBucket`] shared by every writer of one process, on the real clock.
#[derive(Clone, Debug)]
pub struct WriteBudget {
    bucket: Arc<Mutex<TokenBucket>>,
}

impl WriteBudget {
    /// A budget of `bytes_per_second` (0: unlimited).
    pub fn new(bytes_per_second: u64) -> Self {
        Self {
            bucket: Arc::new(Mutex::new(TokenBucket::new(bytes_per_second, Instant::now()))),
        }
    }

    /// No budget: everything is admitted.
    pub fn unlimited() -> Self {
        Self::new(0)
    }

    fn with<T>(&self, f: impl FnOnce(&mut TokenBucket) -> T) -> T {
        f(&mut self.bucket.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Bytes per second; 0 when unlimited.
    pub fn rate(&self) -> u64 {
        self.with(|b| b.rate())
    }

    /// Charges a write of `bytes` that is being sent.
    pub fn charge(&self, bytes: u64) {
        self.with(|b| b.charge(bytes, Instant::now()));
    }

    /// Whether new work may start; else how long to wait.
    pub fn admit(&self) -> Result<(), Duration> {
        self.with(|b| b.admit(Instant::now()))
    }
}

/// Parses a byte count: a whole number with an optional binary (`Ki`, `Mi`, `Gi`) or decimal
/// (`k`, `M`, `G`) suffix, as Kubernetes quantities write them: `524288`, `512Ki`, `4Mi`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!("{text:?} is not a byte count (examples: 524288, 512Ki, 4Mi)"));
    }
    let multiplier: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use Ki, Mi, Gi, k, M or G)"
            ));
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, millis: u64) -> Instant {
        start + Duration::from_millis(millis)
    }

    #[test]
    fn a_full_bucket_admits_then_debt_refuses_until_repaid() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(1000, t0);
        assert_eq!(bucket.admit(t0), Ok(()));
        // 10 s of burst plus 2.5 s of debt.
        bucket.charge(12_500, t0);
        assert_eq!(bucket.admit(t0), Err(Duration::from_secs(3)));
        assert_eq!(bucket.admit(at(t0, 1_000)), Err(Duration::from_secs(2)));
        assert_eq!(bucket.admit(at(t0, 2_400)), Err(Duration::from_secs(1)));
        assert_eq!(bucket.admit(at(t0, 2_500)), Ok(()));
        assert!((bucket.level(at(t0, 2_500))).abs() < 1e-6);
    }

    #[test]
    fn the_bucket_saves_up_at_most_the_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(100, t0);
        bucket.charge(1_000, t0);
        assert!(bucket.level(t0).abs() < 1e-6);
        // An hour idle refills 10 s worth, no more.
        let later = at(t0, 3_600_000);
        assert!((bucket.level(later) - 1_000.0).abs() < 1e-6);
        bucket.charge(1_001, later);
        assert!(bucket.admit(later).is_err());
    }

    #[test]
    fn retry_after_is_capped_and_time_never_runs_backwards() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10, t0);
        bucket.charge(1_000_000, at(t0, 1_000));
        assert_eq!(
            bucket.admit(at(t0, 1_000)),
            Err(Duration::from_secs(MAX_RETRY_AFTER_SECS))
        );
        // An earlier instant (another thread's clock read) refills nothing.
        let level = bucket.level(at(t0, 1_000));
        assert_eq!(bucket.level(t0), level);
    }

    #[test]
    fn a_zero_rate_is_no_budget() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(0, t0);
        bucket.charge(u64::MAX, t0);
        assert_eq!(bucket.admit(t0), Ok(()));
        assert_eq!(bucket.rate(), 0);
        let shared = WriteBudget::unlimited();
        shared.charge(1 << 40);
        assert_eq!(shared.admit(), Ok(()));
    }

    #[test]
    fn the_shared_budget_refuses_once_spent() {
        let budget = WriteBudget::new(1_000);
        assert_eq!(budget.rate(), 1_000);
        assert_eq!(budget.admit(), Ok(()));
        budget.charge(20_000);
        let wait = budget.admit().unwrap_err();
        assert!(
            (Duration::from_secs(9)..=Duration::from_secs(10)).contains(&wait),
            "{wait:?}"
        );
    }

    #[test]
    fn byte_counts_parse_like_quantities() {
        assert_eq!(parse_bytes("524288"), Ok(524_288));
        assert_eq!(parse_bytes("512Ki"), Ok(524_288));
        assert_eq!(parse_bytes("4Mi"), Ok(4 << 20));
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes("2M"), Ok(2_000_000));
        assert_eq!(parse_bytes("0"), Ok(0));
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("Mi").is_err());
        assert!(parse_bytes("5MB").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("99999999999999999999Gi").unwrap_err().contains("too large"));
    }
}
