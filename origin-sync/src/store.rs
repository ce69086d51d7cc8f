//! The embedded profile store (redb): per-user state, consumed offsets and the outbox, changed
//! together in one transaction per batch. That single transaction is what makes each event take
//! effect exactly once: a message whose offset is below the stored next offset of its partition
//! was already folded, so redelivery after a crash is skipped.
//!
//! A user's state is a folded `base` plus a small, sorted *window* of recent events kept
//! unfolded. Topics interleave arbitrarily, so events reach us out of timestamp order; while
//! they are inside the window they are re-folded in `(timestamp, id)` order, which makes the
//! result equal to `fold_all` over the set. Events leave the window (and are folded for good)
//! once they are `reorder_window_ms` older than the user's newest event, or when the window
//! holds `max_window_events`. An event older than the folded part is *late*: it is folded on
//! top (counted) unless it is a known duplicate.
//!
//! Outbox: one entry per user whose current state the sinks have not acknowledged. The delta
//! is computed at send time from the last acknowledged value (`acked`) to the current one, so
//! any number of events coalesce into one write.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use shared::Profile;
use shared::delta::{Change, Delta, Stored, diff};
use shared::event::{Event, EventKind, Line};
use shared::fold::fold;
use shared::keys::UserKey;
use shared::wire::{ConfigDoc, ConfigKind};

const USERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("users");
const OFFSETS: TableDefinition<(&str, i32), i64> = TableDefinition::new("offsets");
const OUTBOX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("outbox");
/// What every sink last acknowledged per user (kept apart: acknowledging rewrites only this).
const ACKED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("acked");
const DOCUMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("documents");

/// A user record as stored: key bytes and encoded state.
pub type RawUser = (Vec<u8>, Vec<u8>);

/// How many folded event ids a user remembers for duplicate detection of late events.
const SEEN_IDS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("profile store: {0}; check the store path and disk, or run `origin-sync replay`")]
    Db(Box<redb::Error>),
    #[error(
        "profile store holds an unreadable record ({0}); restore it or run `origin-sync replay`"
    )]
    Corrupt(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(Box::new(e.into()))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The reorder window's parameters.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub reorder_ms: u64,
    pub max_events: usize,
}

/// One consumed message: its position, and the event when it was valid.
#[derive(Debug)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// None: rejected (already dead-lettered); only the offset moves.
    pub event: Option<Event>,
}

/// What a batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    pub applied: u64,
    /// Messages at offsets already folded (redelivery).
    pub redelivered: u64,
    /// Events whose id and time were already folded.
    pub duplicates: u64,
    /// Events older than the folded part of their user's history.
    pub late: u64,
    /// Events at or before their user's erasure.
    pub erased: u64,
    /// Users whose state changed, with the oldest event time of the batch for them.
    pub touched: Vec<(UserKey, u64)>,
    /// Next offset per partition after the batch.
    pub offsets: Vec<(String, i32, i64)>,
}

/// An event of a user's reorder window, stored in a compact binary form: the window is most
/// of a user's stored state, and that state is rewritten on every change (as JSON the average
/// state was 381 bytes at the benchmark's traffic, 60% of it window).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct WindowEvent {
    ts_ms: u64,
    id: String,
    kind: WindowKind,
}

/// [`EventKind`] with serde derives; `shared` keeps its event type free of a binary form
/// because its only wire form is the validated JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum WindowKind {
    PageView,
    ProductView {
        item: String,
        category: String,
    },
    AddToCart(WindowLine),
    RemoveFromCart {
        item: String,
        quantity: u16,
    },
    Purchase(Vec<WindowLine>),
    Search {
        query: String,
        category: Option<String>,
    },
    Consent {
        personalization: bool,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct WindowLine {
    item: String,
    category: String,
    price_cents: u64,
    quantity: u16,
}

impl From<&Line> for WindowLine {
    fn from(l: &Line) -> Self {
        WindowLine {
            item: l.item.clone(),
            category: l.category.clone(),
            price_cents: l.price_cents,
            quantity: l.quantity,
        }
    }
}

impl From<&WindowLine> for Line {
    fn from(l: &WindowLine) -> Self {
        Line {
            item: l.item.clone(),
            category: l.category.clone(),
            price_cents: l.price_cents,
            quantity: l.quantity,
        }
    }
}

impl WindowEvent {
    fn new(ev: &Event) -> Self {
        let kind = match &ev.kind {
            EventKind::PageView => WindowKind::PageView,
            EventKind::ProductView { item, category } => WindowKind::ProductView {
                item: item.clone(),
                category: category.clone(),
            },
            EventKind::AddToCart(l) => WindowKind::AddToCart(l.into()),
            EventKind::RemoveFromCart { item, quantity } => WindowKind::RemoveFromCart {
                item: item.clone(),
                quantity: *quantity,
            },
            EventKind::Purchase(lines) => {
                WindowKind::Purchase(lines.iter().map(Into::into).collect())
            }
            EventKind::Search { query, category } => WindowKind::Search {
                query: query.clone(),
                category: category.clone(),
            },
            EventKind::Consent { personalization } => WindowKind::Consent {
                personalization: *personalization,
            },
        };
        WindowEvent {
            ts_ms: ev.ts_ms,
            id: ev.id.clone(),
            kind,
        }
    }

    /// The event again, for folding; the fold never reads the user id, which the store keys by.
    fn event(&self) -> Event {
        let kind = match &self.kind {
            WindowKind::PageView => EventKind::PageView,
            WindowKind::ProductView { item, category } => EventKind::ProductView {
                item: item.clone(),
                category: category.clone(),
            },
            WindowKind::AddToCart(l) => EventKind::AddToCart(l.into()),
            WindowKind::RemoveFromCart { item, quantity } => EventKind::RemoveFromCart {
                item: item.clone(),
                quantity: *quantity,
            },
            WindowKind::Purchase(lines) => {
                EventKind::Purchase(lines.iter().map(Into::into).collect())
            }
            WindowKind::Search { query, category } => EventKind::Search {
                query: query.clone(),
                category: category.clone(),
            },
            WindowKind::Consent { personalization } => EventKind::Consent {
                personalization: *personalization,
            },
        };
        Event {
            id: self.id.clone(),
            user: String::new(),
            ts_ms: self.ts_ms,
            kind,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct UserState {
    base: Profile,
    /// Sorted by `(ts_ms, id)`, all after `frozen`.
    window: Vec<WindowEvent>,
    /// Order key of the newest event folded into `base`.
    frozen: Option<(u64, String)>,
    /// Hashes of the ids of recently frozen events, newest last.
    seen: Vec<u64>,
    /// Erased at (version, unix ms).
    erased: Option<(u64, u64)>,
    /// `base` with the window folded on top, kept so in-order events fold incrementally.
    /// Not stored: rebuilt on load, which costs less than writing it with every change.
    #[serde(skip)]
    current: Profile,
}

/// [`UserState`] as stores written before the compact window form hold it (window events as
/// JSON, the folded profile stored too). Read, never written.
#[derive(Deserialize)]
struct LegacyUserState {
    base: Profile,
    window: Vec<LegacyWindowEvent>,
    frozen: Option<(u64, String)>,
    seen: Vec<u64>,
    erased: Option<(u64, u64)>,
    #[allow(dead_code)]
    current: Profile,
}

#[derive(Deserialize)]
struct LegacyWindowEvent {
    #[allow(dead_code)]
    ts_ms: u64,
    #[allow(dead_code)]
    id: String,
    json: Vec<u8>,
}

impl LegacyUserState {
    fn upgrade(self) -> UserState {
        UserState {
            base: self.base,
            // these were validated when first stored
            window: self
                .window
                .iter()
                .filter_map(|w| shared::event::parse_event(&w.json).ok())
                .map(|e| WindowEvent::new(&e))
                .collect(),
            frozen: self.frozen,
            seen: self.seen,
            erased: self.erased,
            current: Profile::default(),
        }
    }
}

/// Outbox entry: the oldest event time not yet acknowledged.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Pending {
    oldest_ts_ms: u64,
}

/// A user's change ready to send: the delta for the edge and the full value for KV.
#[derive(Clone, Debug, PartialEq)]
pub struct OutItem {
    pub delta: Delta,
    pub stored: Stored,
    pub oldest_ts_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct DocState {
    version: u64,
    source: String,
    acked: u64,
}

enum Insert {
    Windowed,
    Late,
    Duplicate,
    Erased,
}

fn id_hash(ts_ms: u64, id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ ts_ms;
    for b in id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl UserState {
    fn fresh(key: &UserKey) -> Self {
        UserState {
            base: Profile::new(key.bucket()),
            current: Profile::new(key.bucket()),
            ..UserState::default()
        }
    }

    /// Folds the window on top of the base again (after an out-of-order arrival).
    fn refold(&mut self) {
        let mut p = self.base.clone();
        for w in &self.window {
            fold(&mut p, &w.event());
        }
        self.current = p;
    }

    fn insert(&mut self, ev: &Event, window: Window) -> Insert {
        if let Some((_, at)) = self.erased
            && ev.ts_ms <= at
        {
            return Insert::Erased;
        }
        let key = (ev.ts_ms, ev.id.as_str());
        if let Some((fts, fid)) = &self.frozen
            && key <= (*fts, fid.as_str())
        {
            let h = id_hash(ev.ts_ms, &ev.id);
            if self.seen.contains(&h) {
                return Insert::Duplicate;
            }
            fold(&mut self.base, ev);
            self.remember(h);
            self.refold();
            return Insert::Late;
        }
        match self
            .window
            .binary_search_by(|w| (w.ts_ms, w.id.as_str()).cmp(&key))
        {
            Ok(_) => return Insert::Duplicate,
            Err(at) => {
                let in_order = at == self.window.len();
                self.window.insert(at, WindowEvent::new(ev));
                if in_order {
                    fold(&mut self.current, ev);
                } else {
                    self.refold();
                }
            }
        }
        let newest = self.window.last().map_or(0, |w| w.ts_ms);
        while let Some(first) = self.window.first() {
            let too_many = self.window.len() > window.max_events;
            let too_old = first.ts_ms.saturating_add(window.reorder_ms) < newest;
            if !(too_many || too_old) {
                break;
            }
            let first = self.window.remove(0);
            fold(&mut self.base, &first.event());
            self.remember(id_hash(first.ts_ms, &first.id));
            self.frozen = Some((first.ts_ms, first.id));
        }
        Insert::Windowed
    }

    fn decode(bytes: &[u8]) -> Result<UserState, StoreError> {
        let mut state: UserState = match decode(bytes, "user") {
            Ok(s) => s,
            // written before window events had their binary form: convert on read
            Err(e) => match postcard::from_bytes::<LegacyUserState>(bytes) {
                Ok(old) => old.upgrade(),
                Err(_) => return Err(e),
            },
        };
        state.refold();
        Ok(state)
    }

    fn remember(&mut self, h: u64) {
        self.seen.push(h);
        if self.seen.len() > SEEN_IDS {
            self.seen.remove(0);
        }
    }

    fn current(&self) -> Stored {
        if let Some((v, _)) = self.erased
            && self.current.version == v
        {
            return Stored::Tombstone { version: v };
        }
        Stored::Profile(self.current.clone())
    }

    fn current_version(&self) -> u64 {
        self.current.version
    }
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs into a Vec cannot fail.
    postcard::to_allocvec(v).unwrap_or_default()
}

fn doc_name(kind: ConfigKind) -> &'static str {
    match kind {
        ConfigKind::Catalog => "catalog",
        ConfigKind::Rules => "rules",
    }
}

/// Change a delta from the acknowledged value to the current one.
fn change_for(acked: Option<&Stored>, current: &Stored) -> Option<Change> {
    if acked == Some(current) {
        return None;
    }
    Some(match (acked, current) {
        (_, Stored::Tombstone { version }) => Change::Tombstone { version: *version },
        (Some(Stored::Profile(old)), Stored::Profile(new)) if old.version < new.version => {
            diff(old, new)
        }
        (_, Stored::Profile(new)) => Change::Snapshot(new.clone()),
    })
}

#[derive(Debug)]
pub struct Store {
    db: Database,
    user_key_secret: Vec<u8>,
    window: Window,
}

impl Store {
    pub fn open(path: &Path, user_key_secret: &[u8], window: Window) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            let _ = std::fs::create_dir_all(dir);
        }
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(USERS)?;
        tx.open_table(OFFSETS)?;
        tx.open_table(OUTBOX)?;
        tx.open_table(ACKED)?;
        tx.open_table(DOCUMENTS)?;
        tx.commit()?;
        Ok(Store {
            db,
            user_key_secret: user_key_secret.to_vec(),
            window,
        })
    }

    pub fn user_key(&self, user_id: &str) -> UserKey {
        UserKey::derive(&self.user_key_secret, user_id)
    }

    /// Folds a batch, moves the offsets and fills the outbox, in one transaction.
    pub fn apply_batch(&self, records: &[Record]) -> Result<BatchOutcome, StoreError> {
        let mut out = BatchOutcome::default();
        let tx = self.db.begin_write()?;
        {
            let mut offsets_t = tx.open_table(OFFSETS)?;
            let mut users_t = tx.open_table(USERS)?;
            let mut outbox_t = tx.open_table(OUTBOX)?;
            let mut next: HashMap<(String, i32), i64> = HashMap::new();
            let mut users: HashMap<UserKey, (UserState, u64, u64)> = HashMap::new();
            for r in records {
                let pk = (r.topic.clone(), r.partition);
                let n = match next.get(&pk) {
                    Some(n) => *n,
                    None => offsets_t
                        .get((r.topic.as_str(), r.partition))?
                        .map_or(0, |g| g.value()),
                };
                if r.offset < n {
                    out.redelivered += 1;
                    next.insert(pk, n);
                    continue;
                }
                next.insert(pk, r.offset + 1);
                let Some(ev) = &r.event else { continue };
                let key = self.user_key(&ev.user);
                let entry = match users.entry(key) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        let state = match users_t.get(key.0.as_slice())? {
                            Some(g) => UserState::decode(g.value())?,
                            None => UserState::fresh(&key),
                        };
                        let version = state.current_version();
                        v.insert((state, version, u64::MAX))
                    }
                };
                match entry.0.insert(ev, self.window) {
                    Insert::Windowed => out.applied += 1,
                    Insert::Late => {
                        out.applied += 1;
                        out.late += 1;
                    }
                    Insert::Duplicate => {
                        out.duplicates += 1;
                        continue;
                    }
                    Insert::Erased => {
                        out.erased += 1;
                        continue;
                    }
                }
                entry.2 = entry.2.min(ev.ts_ms);
            }
            for (key, (state, before, oldest)) in users {
                if state.current_version() == before {
                    continue;
                }
                users_t.insert(key.0.as_slice(), encode(&state).as_slice())?;
                let pending = match outbox_t.get(key.0.as_slice())? {
                    Some(g) => {
                        let p: Pending = decode(g.value(), "outbox")?;
                        Pending {
                            oldest_ts_ms: p.oldest_ts_ms.min(oldest),
                        }
                    }
                    None => Pending {
                        oldest_ts_ms: oldest,
                    },
                };
                outbox_t.insert(key.0.as_slice(), encode(&pending).as_slice())?;
                out.touched.push((key, pending.oldest_ts_ms));
            }
            for ((topic, partition), n) in next {
                offsets_t.insert((topic.as_str(), partition), n)?;
                out.offsets.push((topic, partition, n));
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Erases a user: state gone, a tombstone above every version it had, in the outbox.
    /// Returns the tombstone's version.
    pub fn erase(&self, user_id: &str, now_ms: u64) -> Result<(UserKey, u64), StoreError> {
        let key = self.user_key(user_id);
        let tx = self.db.begin_write()?;
        let version;
        {
            let mut users_t = tx.open_table(USERS)?;
            let mut outbox_t = tx.open_table(OUTBOX)?;
            let old: Option<UserState> = match users_t.get(key.0.as_slice())? {
                Some(g) => Some(UserState::decode(g.value())?),
                None => None,
            };
            let had = old.as_ref().map_or(0, UserState::current_version);
            let at = old
                .as_ref()
                .and_then(|s| s.erased)
                .map_or(now_ms, |(_, t)| t.max(now_ms));
            version = had + 1;
            let mut base = Profile::new(key.bucket());
            base.version = version;
            let state = UserState {
                current: base.clone(),
                base,
                window: Vec::new(),
                frozen: None,
                seen: Vec::new(),
                erased: Some((version, at)),
            };
            users_t.insert(key.0.as_slice(), encode(&state).as_slice())?;
            outbox_t.insert(
                key.0.as_slice(),
                encode(&Pending {
                    oldest_ts_ms: now_ms,
                })
                .as_slice(),
            )?;
        }
        tx.commit()?;
        Ok((key, version))
    }

    /// Every outbox entry, for the sender to start from after a restart.
    pub fn outbox(&self) -> Result<Vec<(UserKey, u64)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let key = <[u8; 12]>::try_from(k.value())
                .map_err(|_| StoreError::Corrupt("outbox key".into()))?;
            let p: Pending = decode(v.value(), "outbox")?;
            out.push((UserKey(key), p.oldest_ts_ms));
        }
        Ok(out)
    }

    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(OUTBOX)?.len()?)
    }

    /// The items to send for `keys`; keys with nothing to send leave the outbox.
    pub fn prepare(&self, keys: &[UserKey]) -> Result<Vec<OutItem>, StoreError> {
        let tx = self.db.begin_read()?;
        let users_t = tx.open_table(USERS)?;
        let outbox_t = tx.open_table(OUTBOX)?;
        let acked_t = tx.open_table(ACKED)?;
        let mut items = Vec::new();
        for key in keys {
            let Some(pending) = outbox_t.get(key.0.as_slice())? else {
                continue;
            };
            let pending: Pending = decode(pending.value(), "outbox")?;
            let Some(state) = users_t.get(key.0.as_slice())? else {
                continue;
            };
            let state: UserState = UserState::decode(state.value())?;
            let current = state.current();
            let acked: Option<Stored> = match acked_t.get(key.0.as_slice())? {
                Some(g) => Some(decode(g.value(), "acked")?),
                None => None,
            };
            if let Some(change) = change_for(acked.as_ref(), &current) {
                items.push(OutItem {
                    delta: Delta { user: *key, change },
                    stored: current,
                    oldest_ts_ms: pending.oldest_ts_ms,
                });
            }
        }
        Ok(items)
    }

    /// Records that every sink acknowledged `items`. Keys in `resend` get a snapshot next
    /// (an edge holds a version it cannot patch). Returns the keys still in the outbox.
    pub fn acknowledge(
        &self,
        items: &[OutItem],
        resend: &[UserKey],
        cleanup: &[UserKey],
    ) -> Result<Vec<UserKey>, StoreError> {
        let mut tx = self.db.begin_write()?;
        // Not persisted on its own (redb's `Eventual` still fsyncs on Linux; `None` does not):
        // the next batch's durable commit persists it. A crash before that only loses
        // acknowledgements, so those items are sent again and the edge and KV skip them by
        // version. Keeps an fsync off every delivery's path.
        tx.set_durability(redb::Durability::None);
        let mut still = Vec::new();
        {
            let users_t = tx.open_table(USERS)?;
            let mut outbox_t = tx.open_table(OUTBOX)?;
            let mut acked_t = tx.open_table(ACKED)?;
            let mut settle = |key: &UserKey, acked: Option<&Stored>| -> Result<(), StoreError> {
                let pending = match users_t.get(key.0.as_slice())? {
                    Some(g) => {
                        let state: UserState = UserState::decode(g.value())?;
                        acked != Some(&state.current())
                    }
                    None => false,
                };
                if pending {
                    still.push(*key);
                } else {
                    outbox_t.remove(key.0.as_slice())?;
                }
                Ok(())
            };
            for item in items {
                let key = item.delta.user;
                if resend.contains(&key) {
                    acked_t.remove(key.0.as_slice())?;
                    settle(&key, None)?;
                } else {
                    acked_t.insert(key.0.as_slice(), encode(&item.stored).as_slice())?;
                    settle(&key, Some(&item.stored))?;
                }
            }
            for key in cleanup {
                let acked: Option<Stored> = match acked_t.get(key.0.as_slice())? {
                    Some(g) => Some(decode(g.value(), "acked")?),
                    None => None,
                };
                settle(key, acked.as_ref())?;
            }
        }
        tx.commit()?;
        still.sort();
        still.dedup();
        Ok(still)
    }

    /// Users erased in this store, as raw records (for `replay`, so erasure survives it).
    pub fn erased_users(&self) -> Result<Vec<RawUser>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(USERS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let state: UserState = UserState::decode(v.value())?;
            if state.erased.is_some() {
                out.push((k.value().to_vec(), v.value().to_vec()));
            }
        }
        Ok(out)
    }

    /// Writes raw user records taken from [`Store::erased_users`] and queues them for delivery.
    pub fn put_users(&self, users: &[RawUser]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(USERS)?;
            let mut o = tx.open_table(OUTBOX)?;
            for (k, v) in users {
                t.insert(k.as_slice(), v.as_slice())?;
                o.insert(k.as_slice(), encode(&Pending::default()).as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The current value stored for a user (tests, tools).
    pub fn current(&self, user_id: &str) -> Result<Option<Stored>, StoreError> {
        let key = self.user_key(user_id);
        let tx = self.db.begin_read()?;
        let t = tx.open_table(USERS)?;
        match t.get(key.0.as_slice())? {
            Some(g) => Ok(Some(UserState::decode(g.value())?.current())),
            None => Ok(None),
        }
    }

    /// Stored next offsets per partition.
    pub fn offsets(&self) -> Result<BTreeMap<(String, i32), i64>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(OFFSETS)?;
        let mut out = BTreeMap::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let (topic, p) = k.value();
            out.insert((topic.to_owned(), p), v.value());
        }
        Ok(out)
    }

    /// Records a catalog or rules source; a changed source gets the next version.
    /// Returns the version when it changed.
    pub fn put_document(&self, kind: ConfigKind, source: &str) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_write()?;
        let changed;
        {
            let mut t = tx.open_table(DOCUMENTS)?;
            let old: Option<DocState> = match t.get(doc_name(kind))? {
                Some(g) => Some(decode(g.value(), "document")?),
                None => None,
            };
            changed = match old {
                Some(d) if d.source == source => None,
                old => {
                    let version = old.as_ref().map_or(1, |d| d.version + 1);
                    let state = DocState {
                        version,
                        source: source.to_owned(),
                        acked: old.map_or(0, |d| d.acked),
                    };
                    t.insert(doc_name(kind), encode(&state).as_slice())?;
                    Some(version)
                }
            };
        }
        tx.commit()?;
        Ok(changed)
    }

    /// Forces the next publication of every document (the `republish` command).
    pub fn republish_documents(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(DOCUMENTS)?;
            let mut all = Vec::new();
            for row in t.iter()? {
                let (k, v) = row?;
                all.push((
                    k.value().to_owned(),
                    decode::<DocState>(v.value(), "document")?,
                ));
            }
            for (k, mut d) in all {
                d.acked = 0;
                t.insert(k.as_str(), encode(&d).as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Documents not yet acknowledged at their current version.
    pub fn pending_documents(&self) -> Result<Vec<ConfigDoc>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(DOCUMENTS)?;
        let mut out = Vec::new();
        for kind in [ConfigKind::Catalog, ConfigKind::Rules] {
            if let Some(g) = t.get(doc_name(kind))? {
                let d: DocState = decode(g.value(), "document")?;
                // The edge reads the JSON form (it carries no TOML parser). The source was
                // validated before it was stored, so conversion cannot fail; skip it if it does.
                if d.acked < d.version
                    && let Ok(source) = shared::catalog::toml_to_json(&d.source)
                {
                    out.push(ConfigDoc {
                        kind,
                        version: d.version,
                        source,
                    });
                }
            }
        }
        Ok(out)
    }

    pub fn acknowledge_documents(&self, docs: &[ConfigDoc]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(DOCUMENTS)?;
            for doc in docs {
                let Some(g) = t.get(doc_name(doc.kind))? else {
                    continue;
                };
                let mut d: DocState = decode(g.value(), "document")?;
                drop(g);
                d.acked = d.acked.max(doc.version);
                t.insert(doc_name(doc.kind), encode(&d).as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::catalog::Catalog;
    use shared::fold::fold_all;
    use shared::traffic::Traffic;

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("origin-sync-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        dir
    }

    fn open(name: &str, window: Window) -> Store {
        Store::open(&tmp(name), b"dev-user-key-secret", window).expect("store opens")
    }

    #[test]
    fn window_events_keep_every_kind_through_the_stored_form() {
        let line = |item: &str| Line {
            item: item.into(),
            category: "cameras".into(),
            price_cents: 129_900,
            quantity: 2,
        };
        let kinds = [
            EventKind::PageView,
            EventKind::ProductView {
                item: "cam-001".into(),
                category: "cameras".into(),
            },
            EventKind::AddToCart(line("cam-001")),
            EventKind::RemoveFromCart {
                item: "cam-001".into(),
                quantity: 1,
            },
            EventKind::Purchase(vec![line("cam-001"), line("lens-002")]),
            EventKind::Search {
                query: "tripod".into(),
                category: Some("accessories".into()),
            },
            EventKind::Search {
                query: "bag".into(),
                category: None,
            },
            EventKind::Consent {
                personalization: false,
            },
        ];
        for kind in kinds {
            let ev = Event {
                id: "e-1".into(),
                user: String::new(),
                ts_ms: 1_764_000_000_123,
                kind,
            };
            let stored = encode(&WindowEvent::new(&ev));
            let back: WindowEvent = decode(&stored, "window").expect("decodes");
            assert_eq!(back.event(), ev);
        }
    }

    #[test]
    fn state_written_before_the_compact_window_form_still_reads() {
        #[derive(Serialize)]
        struct OldWindowEvent {
            ts_ms: u64,
            id: String,
            json: Vec<u8>,
        }
        #[derive(Serialize)]
        struct OldState {
            base: Profile,
            window: Vec<OldWindowEvent>,
            frozen: Option<(u64, String)>,
            seen: Vec<u64>,
            erased: Option<(u64, u64)>,
            current: Profile,
        }
        let catalog = Catalog::demo().expect("demo catalog");
        let events: Vec<Event> = Traffic::new(&catalog, 1, "old", 1_764_000_000_000, 1, 5)
            .take(3)
            .collect();
        let key = UserKey::derive(b"k", "old-u0");
        let mut current = Profile::new(key.bucket());
        fold_all(&mut current, &events);
        let old = OldState {
            base: Profile::new(key.bucket()),
            window: events
                .iter()
                .map(|e| OldWindowEvent {
                    ts_ms: e.ts_ms,
                    id: e.id.clone(),
                    json: e.to_json_bytes(),
                })
                .collect(),
            frozen: None,
            seen: Vec::new(),
            erased: None,
            current: current.clone(),
        };
        let state = UserState::decode(&encode(&old)).expect("reads the old form");
        assert_eq!(state.window.len(), 3);
        assert_eq!(state.current, current);
    }

    fn records(events: &[Event], topic: &str, start: i64) -> Vec<Record> {
        events
            .iter()
            .enumerate()
            .map(|(i, e)| Record {
                topic: topic.into(),
                partition: 0,
                offset: start + i as i64,
                event: Some(e.clone()),
            })
            .collect()
    }

    fn reference(store: &Store, events: &[Event], user: &str) -> Profile {
        let mut p = Profile::new(store.user_key(user).bucket());
        fold_all(&mut p, events.iter().filter(|e| e.user == user));
        p
    }

    #[test]
    fn shuffled_redelivered_duplicated_events_fold_like_fold_all() {
        let catalog = Catalog::demo().expect("demo");
        let events: Vec<Event> = Traffic::new(&catalog, 20, "s", 1_732_960_000_000, 10, 3)
            .take(2000)
            .collect();
        let store = open(
            "shuffle",
            Window {
                reorder_ms: 60_000,
                max_events: 10_000,
            },
        );
        // reverse order within chunks, a redelivered chunk, and duplicate events on another topic
        let mut recs = records(&events, "a", 0);
        recs.reverse();
        for (i, r) in recs.iter_mut().enumerate() {
            r.offset = i as i64;
        }
        for chunk in recs.chunks(300) {
            store.apply_batch(chunk).expect("batch");
        }
        let again = store.apply_batch(&recs[100..400]).expect("redelivery");
        assert_eq!(again.redelivered, 300);
        assert_eq!(again.applied, 0);
        let dups = store
            .apply_batch(&records(&events[..50], "b", 0))
            .expect("dups");
        assert_eq!(dups.duplicates, 50);
        for u in 0..20 {
            let user = format!("s-u{u}");
            let want = reference(&store, &events, &user);
            match store.current(&user).expect("read") {
                Some(Stored::Profile(p)) => assert_eq!(p, want, "{user}"),
                Some(Stored::Tombstone { .. }) | None if want.version == 0 => {}
                other => panic!("{user}: {other:?}"),
            }
        }
    }

    #[test]
    fn outbox_coalesces_and_acknowledges() {
        let catalog = Catalog::demo().expect("demo");
        let events: Vec<Event> = Traffic::new(&catalog, 3, "o", 1_732_960_000_000, 10, 5)
            .take(60)
            .collect();
        let store = open(
            "outbox",
            Window {
                reorder_ms: 1000,
                max_events: 8,
            },
        );
        store.apply_batch(&records(&events, "a", 0)).expect("batch");
        let keys: Vec<UserKey> = store
            .outbox()
            .expect("outbox")
            .into_iter()
            .map(|k| k.0)
            .collect();
        assert!(keys.len() <= 3);
        let items = store.prepare(&keys).expect("prepare");
        assert_eq!(items.len(), keys.len());
        assert!(
            items
                .iter()
                .all(|i| matches!(i.delta.change, Change::Snapshot(_)))
        );
        let still = store.acknowledge(&items, &[], &[]).expect("ack");
        assert!(still.is_empty());
        assert_eq!(store.outbox_len().expect("len"), 0);
        // more events: patches from the acknowledged version
        let more: Vec<Event> = Traffic::new(&catalog, 3, "o", 1_732_960_100_000, 10, 6)
            .take(30)
            .collect();
        store.apply_batch(&records(&more, "a", 60)).expect("batch");
        let keys: Vec<UserKey> = store
            .outbox()
            .expect("outbox")
            .into_iter()
            .map(|k| k.0)
            .collect();
        let items = store.prepare(&keys).expect("prepare");
        for i in &items {
            let Change::Patch { from, .. } = i.delta.change else {
                panic!("expected a patch, got {:?}", i.delta.change)
            };
            let mut held = None;
            for it in &items {
                let _ = it;
            }
            assert!(from > 0);
            held.replace(());
        }
        // a resend request turns the next change into a snapshot
        let first = items[0].delta.user;
        let still = store.acknowledge(&items, &[first], &[]).expect("ack");
        assert_eq!(still, vec![first]);
        let again = store.prepare(&[first]).expect("prepare");
        assert!(matches!(again[0].delta.change, Change::Snapshot(_)));
    }

    #[test]
    fn erasure_wins_over_older_events() {
        let catalog = Catalog::demo().expect("demo");
        let events: Vec<Event> = Traffic::new(&catalog, 1, "e", 1_732_960_000_000, 10, 5)
            .take(10)
            .collect();
        let store = open(
            "erase",
            Window {
                reorder_ms: 1000,
                max_events: 8,
            },
        );
        store.apply_batch(&records(&events, "a", 0)).expect("batch");
        let (_, v) = store.erase("e-u0", 1_732_960_000_050).expect("erase");
        assert_eq!(v, 11);
        assert_eq!(
            store.current("e-u0").expect("read"),
            Some(Stored::Tombstone { version: 11 })
        );
        // an older in-flight event does not bring it back
        let late = store
            .apply_batch(&records(&events[..3], "b", 0))
            .expect("batch");
        assert_eq!(late.erased, 3);
        // a newer one starts a fresh profile above the tombstone
        let mut newer = events[9].clone();
        newer.id = "new".into();
        newer.ts_ms = 1_732_960_001_000;
        store
            .apply_batch(&records(&[newer], "b", 3))
            .expect("batch");
        match store.current("e-u0").expect("read") {
            Some(Stored::Profile(p)) => assert_eq!(p.version, 12),
            other => panic!("{other:?}"),
        }
    }
}
