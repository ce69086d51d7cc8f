//! `POST /ingest` budget per source address: a token bucket of events per connecting IP.
//!
//! Every edge isolate forwards its shoppers' events here, signed; the budget is what keeps one
//! misbehaving (or compromised) caller from filling Kafka and starving the rest. A caller past
//! it is answered 429 with `Retry-After`, which the edge's forwarder honours by trying later.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// Addresses remembered at most; past it, buckets that have refilled are forgotten (a
/// forgotten bucket is a full one, so forgetting only ever lets a caller through).
const MAX_SOURCES: usize = 10_000;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

#[derive(Debug)]
pub struct SourceLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl SourceLimiter {
    pub fn new(per_sec: u32, burst: u32) -> SourceLimiter {
        SourceLimiter {
            per_sec: f64::from(per_sec.max(1)),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `n` events from `source`'s budget at `now_ms`, or says in how many whole seconds
    /// there will be enough.
    pub fn take(&self, source: IpAddr, n: u32, now_ms: u64) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_SOURCES && !buckets.contains_key(&source) {
            let full_after_ms = (self.burst / self.per_sec * 1000.0) as u64;
            buckets.retain(|_, b| now_ms.saturating_sub(b.at_ms) < full_after_ms);
        }
        let bucket = buckets.entry(source).or_insert(Bucket {
            tokens: self.burst,
            at_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(bucket.at_ms) as f64 / 1000.0;
        bucket.tokens = (bucket.tokens + elapsed * self.per_sec).min(self.burst);
        bucket.at_ms = bucket.at_ms.max(now_ms);
        let n = f64::from(n);
        if n <= bucket.tokens {
            bucket.tokens -= n;
            return Ok(());
        }
        let missing = n.min(self.burst) - bucket.tokens;
        Err(((missing / self.per_sec).ceil() as u64).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_has_its_own_budget() {
        let l = SourceLimiter::new(100, 1000);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = 5_000_000;
        assert_eq!(l.take(a, 1000, t0), Ok(()));
        assert_eq!(l.take(a, 1, t0), Err(1));
        assert_eq!(
            l.take(b, 1000, t0),
            Ok(()),
            "another source is not held back"
        );
        assert_eq!(l.take(a, 250, t0 + 2000), Err(1), "200 refilled in 2 s");
        assert_eq!(l.take(a, 200, t0 + 2000), Ok(()));
        assert_eq!(l.take(a, 500, t0 + 2000), Err(5));
    }

    #[test]
    fn memory_stays_bounded_under_many_sources() {
        let l = SourceLimiter::new(10, 10);
        for i in 0..(MAX_SOURCES as u32 * 2) {
            let ip = IpAddr::from(i.to_be_bytes());
            let _ = l.take(ip, 1, u64::from(i) * 2000);
        }
        assert!(l.buckets.lock().unwrap().len() <= MAX_SOURCES);
    }
}
