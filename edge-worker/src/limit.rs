//! Rate limits: a token bucket per key (a shopper's, or an address's), in this isolate's
//! memory. `App::take_budget` decides which buckets a request pays from; it checks them all
//! before it takes from any.
//!
//! `POST /v1/events` takes one token per event, `DELETE /v1/me` twenty. A browser's SDK sends a
//! few events a second at most; a script posting thousands is refused with 429 and
//! `Retry-After` before it costs a parse, a cache write or a forward to origin. The buckets are per isolate, so a client spread
//! over many isolates gets more in total: this bounds what one client costs one isolate, and
//! Cloudflare's rate-limiting rules in front of the worker bound the rest.

use lru::LruCache;
use shared::keys::UserKey;
use std::num::NonZeroUsize;

/// Buckets remembered; the least recently used is forgotten (a full bucket again), which only
/// ever errs towards letting a shopper through.
const MAX_BUCKETS: usize = 10_000;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// Token buckets of `burst` tokens, refilled at `per_sec` tokens a second.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: LruCache<UserKey, Bucket>,
}

impl RateLimiter {
    pub fn new(per_sec: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            per_sec: f64::from(per_sec.max(1)),
            burst: f64::from(burst.max(1)),
            buckets: LruCache::new(NonZeroUsize::new(MAX_BUCKETS).expect("nonzero")),
        }
    }

    /// Takes `n` tokens from `key`'s bucket at `now_ms`, or says in how many whole seconds
    /// there will be enough (a request larger than the burst is told when the bucket is full,
    /// and still refused: it can never fit).
    pub fn take(&mut self, key: UserKey, n: u32, now_ms: u64) -> Result<(), u64> {
        self.settle(key, n, now_ms, true)
    }

    /// Whether [`RateLimiter::take`] would take `n` now, taking nothing: a request that pays
    /// from several budgets checks them all first, so one that refuses it leaves the others
    /// as they were.
    pub fn check(&mut self, key: UserKey, n: u32, now_ms: u64) -> Result<(), u64> {
        self.settle(key, n, now_ms, false)
    }

    fn settle(&mut self, key: UserKey, n: u32, now_ms: u64, take: bool) -> Result<(), u64> {
        let (per_sec, burst) = (self.per_sec, self.burst);
        let bucket = self.buckets.get_or_insert_mut(key, || Bucket {
            tokens: burst,
            at_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(bucket.at_ms) as f64 / 1000.0;
        bucket.tokens = (bucket.tokens + elapsed * per_sec).min(burst);
        bucket.at_ms = bucket.at_ms.max(now_ms);
        let n = f64::from(n);
        if n <= bucket.tokens {
            if take {
                bucket.tokens -= n;
            }
            return Ok(());
        }
        let missing = n.min(burst) - bucket.tokens;
        Err(((missing / per_sec).ceil() as u64).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> UserKey {
        UserKey::derive(b"limit-test-secret", &n.to_string())
    }

    #[test]
    fn a_burst_then_the_refill_rate() {
        let mut l = RateLimiter::new(10, 100);
        let t0 = 1_000_000;
        assert_eq!(l.take(key(1), 100, t0), Ok(()));
        assert_eq!(l.take(key(1), 1, t0), Err(1));
        // another shopper is not affected
        assert_eq!(l.take(key(2), 50, t0), Ok(()));
        // 10 tokens a second: after 1.5 s, 15 tokens
        assert_eq!(l.take(key(1), 15, t0 + 1500), Ok(()));
        assert_eq!(l.take(key(1), 30, t0 + 1500), Err(3));
        // never more than the burst, however long the pause
        assert_eq!(l.take(key(1), 100, t0 + 3_600_000), Ok(()));
        assert_eq!(
            l.take(key(1), 101, t0 + 7_200_000),
            Err(1),
            "larger than the burst"
        );
        // a clock that steps back takes nothing and gives nothing
        assert!(l.take(key(1), 1, t0).is_ok());
        // a check takes nothing
        assert_eq!(l.check(key(3), 100, t0), Ok(()));
        assert_eq!(l.check(key(3), 100, t0), Ok(()));
        assert_eq!(l.check(key(3), 101, t0), Err(1));
        assert_eq!(l.take(key(3), 100, t0), Ok(()));
        assert_eq!(l.check(key(3), 1, t0), Err(1));
    }
}
