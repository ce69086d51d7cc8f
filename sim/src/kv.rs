//! Workers KV as Cloudflare documents it, in virtual time.
//!
//! - One central store; a write is visible at once in the location that made it, and to reads
//!   elsewhere after a replication delay (`replication_ms`, drawn per write).
//! - Every location caches what it read (values and absences) for `cache_ttl_ms` (KV's
//!   `cacheTtl`, default 60 s, minimum 30 s): a read there within it gets the cached value,
//!   however stale. This is where "up to 60 s or more" of propagation comes from.
//! - At most one write per second per key: a faster write fails (Cloudflare answers 429).
//! - At most 1,000 operations per invocation (`Invocation` counts them).
//!
//! Each operation also has a modelled latency (a location-cache hit, a miss to the central
//! store, a write), summed per request for the report; state changes happen at the request's
//! virtual time.

use edge_worker::store::{Store, StoreError, Versioned};
use shared::synthetic::SplitMix64;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// Modelled latencies (ms) of one operation.
pub const HIT_MS: f64 = 1.0;
pub const MISS_MS: f64 = 40.0;
pub const WRITE_MS: f64 = 60.0;
/// Operations one Worker invocation may make.
pub const OPS_PER_INVOCATION: u32 = 1_000;

#[derive(Clone, Debug)]
struct Write {
    value: Versioned,
    at_loc: usize,
    /// When reads from other locations' misses see it.
    visible_ms: u64,
}

#[derive(Debug)]
pub struct Kv {
    /// The newest writes of each key, oldest first (a few, so a read "as of" a location's
    /// view finds the newest it may see).
    central: HashMap<String, Vec<Write>>,
    /// Per location: key → (what was read, when).
    cached: Vec<HashMap<String, (Option<Versioned>, u64)>>,
    last_write_ms: HashMap<String, u64>,
    pub cache_ttl_ms: u64,
    /// Mean of the exponential replication delay.
    pub replication_ms: f64,
    rng: SplitMix64,
    pub stats: KvStats,
}

/// Operation counts, by what the request was.
#[derive(Clone, Debug, Default)]
pub struct KvStats {
    pub reads: HashMap<&'static str, u64>,
    pub writes: HashMap<&'static str, u64>,
    pub cache_hits: u64,
    pub misses: u64,
    pub rate_limited: u64,
    pub over_op_limit: u64,
    /// Writes that landed, per key.
    pub writes_by_key: HashMap<String, u64>,
}

impl Kv {
    pub fn new(locations: usize, cache_ttl_ms: u64, replication_ms: f64, seed: u64) -> Kv {
        Kv {
            central: HashMap::new(),
            cached: (0..locations).map(|_| HashMap::new()).collect(),
            last_write_ms: HashMap::new(),
            cache_ttl_ms,
            replication_ms,
            rng: SplitMix64::new(seed),
            stats: KvStats::default(),
        }
    }

    fn read(&mut self, loc: usize, key: &str, now: u64) -> (Option<Versioned>, f64) {
        if let Some((v, at)) = self.cached[loc].get(key)
            && now.saturating_sub(*at) < self.cache_ttl_ms
        {
            self.stats.cache_hits += 1;
            return (v.clone(), HIT_MS);
        }
        self.stats.misses += 1;
        let value = self.central.get(key).and_then(|ws| {
            ws.iter()
                .rev()
                .find(|w| w.at_loc == loc || w.visible_ms <= now)
                .map(|w| w.value.clone())
        });
        self.cached[loc].insert(key.to_owned(), (value.clone(), now));
        (value, MISS_MS)
    }

    /// A write from `loc` (`None`: from outside every location, as the REST bulk API).
    pub fn write(
        &mut self,
        loc: Option<usize>,
        key: &str,
        value: Versioned,
        now: u64,
    ) -> Result<f64, StoreError> {
        if self
            .last_write_ms
            .get(key)
            .is_some_and(|t| now.saturating_sub(*t) < 1_000)
        {
            self.stats.rate_limited += 1;
            return Err(StoreError::Backend(
                "429: more than one write per second to this key".into(),
            ));
        }
        self.last_write_ms.insert(key.to_owned(), now);
        *self.stats.writes_by_key.entry(key.to_owned()).or_default() += 1;
        let delay = -self.replication_ms * (1.0 - self.rng.unit()).ln();
        let ws = self.central.entry(key.to_owned()).or_default();
        ws.push(Write {
            value: value.clone(),
            at_loc: loc.unwrap_or(usize::MAX),
            visible_ms: now + delay as u64,
        });
        if ws.len() > 4 {
            ws.remove(0);
        }
        if let Some(loc) = loc {
            self.cached[loc].insert(key.to_owned(), (Some(value), now));
        }
        Ok(WRITE_MS)
    }
}

/// One invocation's view of KV: its location, its clock, its operation budget and what it
/// is (for the counts).
#[derive(Debug)]
pub struct Invocation<'a> {
    pub kv: &'a RefCell<Kv>,
    pub loc: usize,
    pub now: u64,
    pub class: &'static str,
    pub ops: Cell<u32>,
    /// Modelled KV time of this invocation.
    pub kv_ms: Cell<f64>,
}

impl<'a> Invocation<'a> {
    pub fn new(kv: &'a RefCell<Kv>, loc: usize, now: u64, class: &'static str) -> Self {
        Invocation {
            kv,
            loc,
            now,
            class,
            ops: Cell::new(0),
            kv_ms: Cell::new(0.0),
        }
    }

    fn charge(&self) -> Result<(), StoreError> {
        self.ops.set(self.ops.get() + 1);
        if self.ops.get() > OPS_PER_INVOCATION {
            self.kv.borrow_mut().stats.over_op_limit += 1;
            return Err(StoreError::Backend(
                "too many API requests by a single Worker invocation".into(),
            ));
        }
        Ok(())
    }
}

impl Store for Invocation<'_> {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.charge()?;
        let mut kv = self.kv.borrow_mut();
        *kv.stats.reads.entry(self.class).or_default() += 1;
        let (v, ms) = kv.read(self.loc, key, self.now);
        self.kv_ms.set(self.kv_ms.get() + ms);
        Ok(v)
    }

    async fn put(&self, key: &str, value: &[u8], version: u64) -> Result<(), StoreError> {
        self.charge()?;
        let mut kv = self.kv.borrow_mut();
        *kv.stats.writes.entry(self.class).or_default() += 1;
        let ms = kv.write(
            Some(self.loc),
            key,
            (value.to_vec(), Some(version)),
            self.now,
        )?;
        self.kv_ms.set(self.kv_ms.get() + ms);
        Ok(())
    }

    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        self.charge()?;
        let kv = self.kv.borrow();
        let mut keys: Vec<String> = kv
            .central
            .keys()
            .filter(|k| k.starts_with(prefix))
            .take(limit)
            .cloned()
            .collect();
        keys.sort();
        Ok(keys)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.charge()?;
        let mut kv = self.kv.borrow_mut();
        *kv.stats.writes.entry(self.class).or_default() += 1;
        kv.central.remove(key);
        kv.cached[self.loc].remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_seen_at_once_where_made_and_after_the_cache_ttl_elsewhere() {
        let kv = RefCell::new(Kv::new(2, 60_000, 0.0, 1));
        let get = |loc, now| {
            let inv = Invocation::new(&kv, loc, now, "t");
            let mut f = std::pin::pin!(inv.get("k"));
            match f
                .as_mut()
                .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
            {
                std::task::Poll::Ready(v) => v.expect("read").map(|(_, v)| v.unwrap_or(0)),
                std::task::Poll::Pending => unreachable!(),
            }
        };
        use std::future::Future;
        assert_eq!(get(1, 0), None); // location 1 caches the absence
        kv.borrow_mut()
            .write(Some(0), "k", (vec![1], Some(1)), 10)
            .expect("write");
        assert_eq!(get(0, 10), Some(1));
        assert_eq!(get(1, 59_999), None, "cached absence until its TTL");
        assert_eq!(get(1, 60_000), Some(1));
        assert!(
            kv.borrow_mut()
                .write(Some(0), "k", (vec![2], Some(2)), 500)
                .is_err(),
            "one write per second per key"
        );
    }
}
