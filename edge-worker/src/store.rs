//! The key-value store behind the profile cache: Workers KV in production (see `glue`), an
//! in-memory map in tests.
//!
//! Values are opaque bytes with the version they hold beside them (KV metadata `{"v": n}`), so a
//! writer can tell what it would replace without decoding it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// Why a store operation failed. The handlers degrade on any of these; none is a 5xx page.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("store did not answer within {0} ms")]
    Timeout(u32),
    #[error("store error: {0}")]
    Backend(String),
}

impl StoreError {
    /// Workers KV refused a write for its limit of one write per second to a key (HTTP 429,
    /// which the binding reports in its error message): that key only, and only for now.
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, StoreError::Backend(m) if m.contains("429"))
    }
}

/// A value and the version its metadata carries (`None`: written without metadata).
pub type Versioned = (Vec<u8>, Option<u64>);

/// The store the edge reads profiles and config from and writes synced changes to.
///
/// Not `Send`: a Workers isolate is single-threaded, and so are the native tests.
#[allow(async_fn_in_trait)]
pub trait Store {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;

    /// A published document (catalog, rules, fence): larger than a profile, read rarely and
    /// not for one shopper's page, so the KV store gives it a longer timeout
    /// (`CONFIG_TIMEOUT_MS`) than a profile read.
    async fn get_document(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.get(key).await
    }

    async fn put(&self, key: &str, value: &[u8], version: u64) -> Result<(), StoreError>;

    /// Waits about `ms` on the runtime's clock, for a request that waits on another's read (the
    /// KV binding's runtime cancels a request waiting on nothing of its own as hung). Stores
    /// without a clock yield once.
    async fn pause(&self, _ms: u32) {
        let mut yielded = false;
        std::future::poll_fn(|cx| {
            if yielded {
                return std::task::Poll::Ready(());
            }
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        })
        .await;
    }

    /// Up to `limit` keys starting with `prefix`. Only the erasure sweep lists; stores that
    /// never hold pending erasures need not support it.
    async fn list(&self, _prefix: &str, _limit: usize) -> Result<Vec<String>, StoreError> {
        Err(StoreError::Backend("this store cannot list keys".into()))
    }

    async fn delete(&self, _key: &str) -> Result<(), StoreError> {
        Err(StoreError::Backend("this store cannot delete keys".into()))
    }
}

/// An in-memory [`Store`] that can be told to fail, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: RefCell<HashMap<String, Versioned>>,
    failing: Cell<bool>,
    failing_writes: Cell<bool>,
    /// Writes of keys under this prefix fail.
    failing_under: RefCell<Option<String>>,
    reads: Cell<u64>,
    writes: Cell<u64>,
    /// Keys read, in order, since the last [`MemoryStore::take_read_keys`]; `None` until the
    /// first call (benchmarks over this store do not pay for the log).
    read_keys: RefCell<Option<Vec<String>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// Makes every later operation fail (true) or succeed again (false).
    pub fn set_failing(&self, failing: bool) {
        self.failing.set(failing);
    }

    /// Makes later writes fail (true) while reads still succeed.
    pub fn set_failing_writes(&self, failing: bool) {
        self.failing_writes.set(failing);
    }

    /// Makes later writes of keys starting with `prefix` fail (`None`: none).
    pub fn set_failing_writes_under(&self, prefix: Option<&str>) {
        *self.failing_under.borrow_mut() = prefix.map(str::to_owned);
    }

    pub fn reads(&self) -> u64 {
        self.reads.get()
    }

    /// The keys read since the last call, in order; the first call starts the log.
    pub fn take_read_keys(&self) -> Vec<String> {
        self.read_keys
            .borrow_mut()
            .replace(Vec::new())
            .unwrap_or_default()
    }

    pub fn writes(&self) -> u64 {
        self.writes.get()
    }

    pub fn raw(&self, key: &str) -> Option<Versioned> {
        self.map.borrow().get(key).cloned()
    }

    /// Every key and value, in no particular order.
    pub fn entries(&self) -> Vec<(String, Versioned)> {
        self.map
            .borrow()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Forgets every value, as a new namespace would.
    pub fn clear(&self) {
        self.map.borrow_mut().clear();
    }

    pub fn insert_raw(&self, key: &str, value: Vec<u8>, version: Option<u64>) {
        self.map
            .borrow_mut()
            .insert(key.to_owned(), (value, version));
    }
}

impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.reads.set(self.reads.get() + 1);
        if let Some(log) = self.read_keys.borrow_mut().as_mut() {
            log.push(key.to_owned());
        }
        if self.failing.get() {
            return Err(StoreError::Timeout(50));
        }
        Ok(self.map.borrow().get(key).cloned())
    }

    async fn put(&self, key: &str, value: &[u8], version: u64) -> Result<(), StoreError> {
        self.writes.set(self.writes.get() + 1);
        let under = self
            .failing_under
            .borrow()
            .as_deref()
            .is_some_and(|p| key.starts_with(p));
        if self.failing.get() || self.failing_writes.get() || under {
            return Err(StoreError::Backend("injected failure".into()));
        }
        self.map
            .borrow_mut()
            .insert(key.to_owned(), (value.to_vec(), Some(version)));
        Ok(())
    }

    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        self.reads.set(self.reads.get() + 1);
        if self.failing.get() {
            return Err(StoreError::Timeout(50));
        }
        let mut keys: Vec<String> = self
            .map
            .borrow()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        // KV lists in key order
        keys.sort();
        keys.truncate(limit);
        Ok(keys)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.writes.set(self.writes.get() + 1);
        if self.failing.get() || self.failing_writes.get() {
            return Err(StoreError::Backend("injected failure".into()));
        }
        self.map.borrow_mut().remove(key);
        Ok(())
    }
}
