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
//! Outbox: one entry per user whose current state some sink has not acknowledged. The delta
//! is computed at send time, per sink, from the value that sink last acknowledged to the
//! current one, so any number of events coalesce into one write (`sinks.rs`).

mod documents;
mod layout;
mod partitions;
mod sinks;
mod state;

pub use partitions::{
    Applier, LogRecord, LogValue, Logged, PreparedRecord, Restored, Revocations, Stamp,
};
pub use sinks::{Quarantined, Settled, SinkReport, Subject};

pub use state::Window;
use state::{Insert, UserState};

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use shared::delta::{Delta, Stored};
use shared::event::{Event, EventKind};
use shared::keys::UserKey;

const USERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("users");
const OFFSETS: TableDefinition<(&str, i32), i64> = TableDefinition::new("offsets");
/// `UserKey` → [`Pending`]: the users with a change not yet acknowledged by every sink.
/// Fixed-width keys and values (layout 4): redb then keeps no per-entry offsets in a leaf,
/// which a table of small variable-width entries rewrites on every insert, wherever it lands
/// (measured: twice the cost of an insert; a restore puts a partition's every shopper here).
const OUTBOX: TableDefinition<&[u8; 12], Pending> = TableDefinition::new("outbox_fixed");
/// What every sink last acknowledged per user, in stores written before each sink had its own
/// progress (`sinks.rs`); read as the starting point of a sink without a mark of its own.
const ACKED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("acked");
const DOCUMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("documents");

/// A user record as stored: key bytes and encoded state.
pub type RawUser = (Vec<u8>, Vec<u8>);

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

/// One consumed message: its position, and the event when it was valid.
#[derive(Debug)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// None: rejected (already dead-lettered); only the offset moves.
    pub event: Option<Event>,
    /// When the broker took the message (its timestamp, Unix ms): what an erasure's cutoff
    /// compares with. `None` when the broker gave none.
    pub arrived_ms: Option<u64>,
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
    /// Sign-ins that joined a visitor's profile into the signed-in one.
    pub identified: u64,
    /// Users whose state changed, with the oldest event time of the batch for them.
    pub touched: Vec<(UserKey, u64)>,
    /// Next offset per partition after the batch.
    pub offsets: Vec<(String, i32, i64)>,
    /// The changelog records of the changed users (a partitioned store only).
    pub logged: Vec<Logged>,
}

/// Outbox entry: the oldest change not yet acknowledged, by the time its event says (the
/// browser's or a server's clock) and by when the broker took it (`Record::arrived_ms`).
/// Freshness is measured from the broker's time; the event's own is kept as a separate,
/// labelled figure, since a browser's clock may be off by anything.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Pending {
    oldest_ts_ms: u64,
    /// Added in layout 2; a layout-1 entry (the event time alone) reads as both.
    oldest_arrived_ms: u64,
    /// When this store wrote the oldest pending change, by this process's monotonic clock
    /// (`clock::monotonic_ms`): what the changelog's acknowledged watermark is decided by
    /// (`changelog::Watermarks`). Added after layout 2 without a layout change (an older build
    /// reads the first two fields and ignores it); an entry without it reads 0, "as old as
    /// can be", which only holds the watermark back until that entry retires.
    oldest_stored_ms: u64,
}

impl Pending {
    /// A change stored now.
    fn at(ts_ms: u64, arrived_ms: u64) -> Pending {
        Pending {
            oldest_ts_ms: ts_ms,
            oldest_arrived_ms: arrived_ms,
            oldest_stored_ms: crate::clock::monotonic_ms(),
        }
    }

    /// This entry and a change stored now.
    fn merge(self, ts_ms: u64, arrived_ms: u64) -> Pending {
        Pending {
            oldest_ts_ms: self.oldest_ts_ms.min(ts_ms),
            oldest_arrived_ms: self.oldest_arrived_ms.min(arrived_ms),
            oldest_stored_ms: self.oldest_stored_ms,
        }
    }

    /// Reads an entry of layouts 1 to 3 (postcard, in the `outbox` table the upgrade to layout
    /// 4 empties): three varints, two (layout 2: stored at an unknown time), or the event time
    /// alone (layout 1).
    fn decode(bytes: &[u8]) -> Result<Pending, StoreError> {
        if let Ok(p) = postcard::from_bytes::<Pending>(bytes) {
            return Ok(p);
        }
        let (ts, arrived) = match postcard::from_bytes::<(u64, u64)>(bytes) {
            Ok(two) => two,
            Err(_) => {
                let ts: u64 = decode(bytes, "outbox")?;
                (ts, ts)
            }
        };
        Ok(Pending {
            oldest_ts_ms: ts,
            oldest_arrived_ms: arrived,
            oldest_stored_ms: 0,
        })
    }

    fn oldest(self) -> Oldest {
        Oldest {
            event_ms: self.oldest_ts_ms,
            broker_ms: self.oldest_arrived_ms,
        }
    }
}

/// Stored as three little-endian u64s (layout 4), in field order; before, postcard
/// ([`Pending::decode`]).
impl redb::Value for Pending {
    type SelfType<'a> = Pending;
    type AsBytes<'a> = [u8; 24];

    fn fixed_width() -> Option<usize> {
        Some(24)
    }

    fn from_bytes<'a>(data: &'a [u8]) -> Pending
    where
        Self: 'a,
    {
        // redb hands a fixed-width value exactly its width
        let word = |i: usize| {
            data.get(i * 8..i * 8 + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_le_bytes)
        };
        Pending {
            oldest_ts_ms: word(0),
            oldest_arrived_ms: word(1),
            oldest_stored_ms: word(2),
        }
    }

    fn as_bytes<'a, 'b: 'a>(value: &'a Pending) -> [u8; 24]
    where
        Self: 'b,
    {
        let mut out = [0; 24];
        for (i, word) in [
            value.oldest_ts_ms,
            value.oldest_arrived_ms,
            value.oldest_stored_ms,
        ]
        .into_iter()
        .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
        }
        out
    }

    fn type_name() -> redb::TypeName {
        redb::TypeName::new("edgewise::store::Pending")
    }
}

/// When the oldest change of a retired outbox entry happened, by the event's own clock and by
/// the broker's (Unix ms).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Oldest {
    pub event_ms: u64,
    pub broker_ms: u64,
}

/// A user's change ready to send: the delta for the edge and the full value for KV.
#[derive(Clone, Debug, PartialEq)]
pub struct OutItem {
    pub delta: Delta,
    pub stored: Stored,
    pub oldest_ts_ms: u64,
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    encode_onto(Vec::with_capacity(ENCODE_CAPACITY), v)
}

/// Room a value is first encoded into: most of the store's values (a shopper's state, a
/// changelog record) fit, where growing from nothing took four or five copies of each.
const ENCODE_CAPACITY: usize = 256;

/// `v` encoded after what `out` holds.
fn encode_onto<T: Serialize>(out: Vec<u8>, v: &T) -> Vec<u8> {
    // Serializing these plain structs into a Vec cannot fail.
    postcard::to_extend(v, out).unwrap_or_default()
}

#[derive(Debug)]
pub struct Store {
    db: Database,
    user_key_secret: Vec<u8>,
    window: Window,
    /// Partition state moves between instances (`assignment = "group"`): stamps, changelog
    /// records and unlogged marks are kept (`partitions.rs`).
    partitioned: bool,
    /// The partition numbers this instance owns (partitioned only).
    owned: std::sync::Mutex<std::collections::BTreeSet<i32>>,
    /// Of those, the ones whose restore has not finished (partitioned only).
    restoring: std::sync::Mutex<std::collections::BTreeSet<i32>>,
    /// Held while changelog records are applied: an owner's restore and a standby's tail of
    /// the same partition never interleave.
    applying: std::sync::Mutex<()>,
    /// How many times each partition left `owned` (partitioned only): the changelog's
    /// watermark samples of a partition taken before its revocation are void, even if it came
    /// back since.
    revocations: std::sync::Mutex<partitions::Revocations>,
    /// Partitions that left `owned` and whose outbox entries are not released yet
    /// (`Store::release`): the sinks may still hold their users' older states.
    unreleased: std::sync::Mutex<std::collections::BTreeSet<i32>>,
    /// Per partition, the epoch of this instance's latest ownership of it (`Store::claim`),
    /// kept after it leaves: a batch folded late, after a revocation, is stamped with the
    /// ownership it was consumed under, which a later owner's records outrank.
    epochs: std::sync::Mutex<BTreeMap<i32, u64>>,
    /// The group generation that gave each owned partition to this instance, as the service
    /// sees it (partitioned only): a commit goes out only while librdkafka holds the partition
    /// under the same one (`changelog.rs`).
    owned_at: std::sync::Mutex<BTreeMap<i32, u64>>,
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
        tx.open_table(sinks::SINK_MARKS)?;
        tx.open_table(sinks::SINK_DOCUMENTS)?;
        tx.open_table(sinks::QUARANTINE)?;
        tx.open_table(partitions::UNLOGGED)?;
        tx.open_table(partitions::CHANGELOG_POS)?;
        tx.open_table(partitions::STANDBY)?;
        tx.open_table(partitions::STANDBY_AT)?;
        tx.open_table(partitions::REREAD_MARKS)?;
        tx.open_table(partitions::EPOCHS)?;
        let upgraded = layout::upgrade(&tx)?;
        tx.commit()?;
        if upgraded > 0 {
            tracing::info!(
                records = upgraded,
                layout = layout::LAYOUT,
                "store upgraded to the current layout"
            );
        }
        let store = Store {
            db,
            user_key_secret: user_key_secret.to_vec(),
            window,
            partitioned: false,
            owned: std::sync::Mutex::default(),
            restoring: std::sync::Mutex::default(),
            applying: std::sync::Mutex::default(),
            revocations: std::sync::Mutex::default(),
            unreleased: std::sync::Mutex::default(),
            epochs: std::sync::Mutex::default(),
            owned_at: std::sync::Mutex::default(),
        };
        // A wall clock stepped back across a restart must not make this process's changes
        // look older than what an earlier one left pending (the acknowledged watermark
        // compares them): the monotonic clock starts past every stored time.
        crate::clock::monotonic_not_below(store.outbox_newest_stored()?);
        Ok(store)
    }

    /// The newest time an outbox entry says its oldest change was stored (0: none).
    fn outbox_newest_stored(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(OUTBOX)?;
        let mut newest = 0;
        for row in t.iter()? {
            newest = newest.max(row?.1.value().oldest_stored_ms);
        }
        Ok(newest)
    }

    /// Keeps what moving partitions between instances needs (`partitions.rs`).
    pub fn partitioned(mut self) -> Store {
        self.partitioned = true;
        self
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
            let mut unlogged_t = tx.open_table(partitions::UNLOGGED)?;
            let mut next: HashMap<(String, i32), i64> = HashMap::new();
            let mut users: Loaded = HashMap::new();
            let mut stamps: HashMap<UserKey, Stamp> = HashMap::new();
            let epochs = self.epochs();
            // each event's user key once (a keyed hash), and the batch's users read in key
            // order: the B-tree's pages one after another instead of at random
            let keys: Vec<Option<UserKey>> = records
                .iter()
                .map(|r| r.event.as_ref().map(|ev| self.user_key(&ev.user)))
                .collect();
            let mut in_order: Vec<UserKey> = keys.iter().flatten().copied().collect();
            in_order.sort_unstable_by_key(|key| key.0);
            in_order.dedup();
            users.reserve(in_order.len());
            for key in in_order {
                load(&mut users, &users_t, key)?;
            }
            for (r, key) in records.iter().zip(keys) {
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
                let (Some(ev), Some(key)) = (&r.event, key) else {
                    continue;
                };
                if self.partitioned {
                    // folded by whoever wrote this state (another owner, before a handover)
                    let stamp = load_stamp(&mut stamps, &users_t, key, r.partition)?;
                    if stamp.next_of(&r.topic) > r.offset {
                        out.redelivered += 1;
                        continue;
                    }
                    stamp.advance(&r.topic, r.offset + 1);
                }
                // a sign-in: the visitor's profile, as it stands now, travels in the event, so
                // every later refold of this user's window folds the same thing
                let mut joined = None;
                let identified;
                let ev = match &ev.kind {
                    EventKind::Identify {
                        anonymous,
                        absorbed: None,
                    } if self.user_key(anonymous) != key
                        && self.joinable(&mut stamps, &users_t, anonymous, r.partition)? =>
                    {
                        let anon = self.user_key(anonymous);
                        load(&mut users, &users_t, anon)?;
                        let visitor = users.get(&anon).map(|e| e.0.current());
                        let absorbed = match visitor {
                            Some(Stored::Profile(p)) if p.version > 0 => {
                                joined = Some((anon, p.version));
                                Some(Box::new(p))
                            }
                            _ => None,
                        };
                        identified = Event {
                            kind: EventKind::Identify {
                                anonymous: anonymous.clone(),
                                absorbed,
                            },
                            ..ev.clone()
                        };
                        &identified
                    }
                    _ => ev,
                };
                let Some(entry) = users.get_mut(&key) else {
                    continue;
                };
                match entry.0.insert(ev, r.arrived_ms, self.window) {
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
                let arrived = r.arrived_ms.unwrap_or(ev.ts_ms);
                entry.3 = entry.3.min(arrived);
                // the visitor's profile now lives in the signed-in one: retire it (a new epoch,
                // so no copy of it anywhere outranks the retirement), dropping nothing that
                // arrives for that visitor later
                if let Some((anon, version)) = joined
                    && let Some(visitor) = users.get_mut(&anon)
                {
                    // an earlier erasure's cutoff stays: what the visitor did before it and
                    // arrives late is still dropped, not folded into a fresh visitor profile
                    let cutoff = visitor.0.erased().map_or(0, |(_, at)| at);
                    visitor.0 = UserState::tombstone(
                        &anon,
                        shared::delta::tombstone_version(version),
                        cutoff,
                    );
                    visitor.2 = visitor.2.min(ev.ts_ms);
                    visitor.3 = visitor.3.min(arrived);
                    out.identified += 1;
                }
            }
            // in key order: each B-tree below is written leaf after leaf instead of at random
            // (user keys are hashes), which keeps the pages a batch touches few and warm
            // the keys sorted, not the working set: a user's state is hundreds of bytes, and
            // moving the batch's states into a vector and sorting it copied megabytes per batch
            let mut order: Vec<UserKey> = users.keys().copied().collect();
            order.sort_unstable_by_key(|key| key.0);
            for key in order {
                let Some((state, before, oldest, arrived)) = users.get(&key) else {
                    continue;
                };
                let (before, oldest, arrived) = (*before, *oldest, *arrived);
                if state.current_version() == before {
                    continue;
                }
                let encoded = state.encode();
                // every user a partitioned batch writes has its stamp in the working set
                // (`load_stamp`, `joinable`); a static assignment loads none. Stamped with
                // this instance's ownership of the partition: what it writes now outranks
                // every earlier owner's records and loses to every later owner's.
                let stamp = stamps.get_mut(&key).map(|s| {
                    if let Some(e) = epochs.get(&s.partition) {
                        s.epoch = *e;
                    }
                    &*s
                });
                users_t.insert(
                    key.0.as_slice(),
                    partitions::user_value(stamp, &encoded).as_slice(),
                )?;
                if let Some(stamp) = stamp {
                    let version = state.current_version();
                    unlogged_t.insert(key.0.as_slice(), (version, crate::clock::now_ms()))?;
                    out.logged.push(Logged {
                        partition: stamp.partition,
                        key,
                        version,
                        value: LogValue {
                            layout: layout::STATE_LAYOUT,
                            stamp: stamp.clone(),
                            state: encoded,
                        }
                        .to_bytes(),
                    });
                }
                let pending = match outbox_t.get(&key.0)? {
                    Some(g) => g.value().merge(oldest, arrived),
                    None => Pending::at(oldest, arrived),
                };
                outbox_t.insert(&key.0, pending)?;
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
    /// Erases `user_id` at `at_ms`: (key, version now, whether anything changed).
    pub fn erase(&self, user_id: &str, at_ms: u64) -> Result<(UserKey, u64, bool), StoreError> {
        self.erase_key(self.user_key(user_id), at_ms, None)
    }

    /// [`Store::erase`] of the user with this key (the edge names users by key only).
    ///
    /// `at_least`: the tombstone version the edge wrote for this erasure, if it said
    /// ([`shared::protocol::KeyErasureBody::tombstone_version`]); the tombstone is never below
    /// it.
    pub fn erase_key(
        &self,
        key: UserKey,
        at_ms: u64,
        at_least: Option<u64>,
    ) -> Result<(UserKey, u64, bool), StoreError> {
        let tx = self.db.begin_write()?;
        let (version, changed) = {
            let mut users_t = tx.open_table(USERS)?;
            let mut outbox_t = tx.open_table(OUTBOX)?;
            erase_in(
                &mut users_t,
                &mut outbox_t,
                key,
                at_ms,
                at_least,
                self.window,
                &self.owned_epochs(),
            )?
        };
        if changed {
            self.log_erasure(&tx, key, version, crate::clock::now_ms())?;
            // fenced from when origin stored it, not when the edge accepted it: an erasure
            // delivered late (origin was down) is fenced while writes from before it may
            // still land
            documents::fence_erasures(
                &tx,
                &[(key, version, crate::clock::now_ms())],
                self.versions(),
            )?;
            tx.commit()?;
        }
        Ok((key, version, changed))
    }

    /// Applies records of the erasure log (`crate::erasures`) and moves its offsets, in one
    /// transaction. Returns the users whose state changed (already erased as late: no change).
    pub fn apply_erasures(&self, records: &[ErasureRecord]) -> Result<Vec<UserKey>, StoreError> {
        let owned_epochs = self.owned_epochs();
        let tx = self.db.begin_write()?;
        let mut changed = Vec::new();
        {
            let mut users_t = tx.open_table(USERS)?;
            let mut outbox_t = tx.open_table(OUTBOX)?;
            let mut offsets_t = tx.open_table(OFFSETS)?;
            for r in records {
                let next = offsets_t
                    .get((r.topic.as_str(), r.partition))?
                    .map_or(0, |g| g.value());
                if r.offset < next {
                    continue;
                }
                if let Some(e) = &r.erasure {
                    let key = e.user_key;
                    let (version, did) = erase_in(
                        &mut users_t,
                        &mut outbox_t,
                        key,
                        e.erased_at_ms,
                        e.tombstone_version,
                        self.window,
                        &owned_epochs,
                    )?;
                    if did {
                        changed.push((key, version, crate::clock::now_ms()));
                    }
                }
                offsets_t.insert((r.topic.as_str(), r.partition), r.offset + 1)?;
            }
        }
        for (key, version, now) in &changed {
            self.log_erasure(&tx, *key, *version, *now)?;
        }
        documents::fence_erasures(&tx, &changed, self.versions())?;
        tx.commit()?;
        Ok(changed.into_iter().map(|(key, ..)| key).collect())
    }

    /// Every outbox entry, for the sender to start from after a restart.
    pub fn outbox(&self) -> Result<Vec<(UserKey, u64)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((UserKey(*k.value()), v.value().oldest_ts_ms));
        }
        Ok(out)
    }

    /// The oldest `clock::monotonic_ms` at which a change still in the outbox was stored
    /// (`None`: the outbox is empty): every change stored before it has been acknowledged by
    /// every sink (or quarantined). One pass over the outbox, which holds what is in flight
    /// or behind; it stops at the first entry stored at or before `enough` (the caller can do
    /// nothing with an older answer), so an outbox that is large because a sink is down is
    /// not read through every second.
    pub fn outbox_oldest_stored(&self, enough: u64) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(OUTBOX)?;
        let mut oldest = None;
        for row in t.iter()? {
            let stored = row?.1.value().oldest_stored_ms;
            let o = oldest.map_or(stored, |o: u64| o.min(stored));
            oldest = Some(o);
            if o <= enough {
                break;
            }
        }
        Ok(oldest)
    }

    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(OUTBOX)?.len()?)
    }

    /// Users erased in this store, as raw records (for `replay`, so erasure survives it).
    pub fn erased_users(&self) -> Result<Vec<RawUser>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(USERS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let state = partitions::state_of(v.value())?;
            if state.erased().is_some() {
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
                let key = partitions::user_key(k, "user")?;
                o.insert(&key.0, Pending::default())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The current value stored for a user (tests, tools).
    /// The last erasure of the user with this key, as this store holds it: (the tombstone's
    /// version, its cutoff in Unix ms).
    pub fn erasure_of(&self, key: UserKey) -> Result<Option<(u64, u64)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(USERS)?;
        match t.get(key.0.as_slice())? {
            Some(g) => Ok(partitions::state_of(g.value())?.erased()),
            None => Ok(None),
        }
    }

    pub fn current(&self, user_id: &str) -> Result<Option<Stored>, StoreError> {
        let key = self.user_key(user_id);
        let tx = self.db.begin_read()?;
        let t = tx.open_table(USERS)?;
        match t.get(key.0.as_slice())? {
            Some(g) => Ok(Some(partitions::state_of(g.value())?.current())),
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
}

type Loaded = HashMap<UserKey, (UserState, u64, u64, u64)>;

impl Store {
    /// Whether a sign-in on `partition` may join the visitor `anonymous`'s profile. In a
    /// partitioned store only a visitor of the same partition is joined: another partition's
    /// state may be another instance's, and the fold must not depend on who owns what (a
    /// visitor's history then stays its own; see ARCHITECTURE.md).
    fn joinable(
        &self,
        stamps: &mut HashMap<UserKey, Stamp>,
        users_t: &redb::Table<&[u8], &[u8]>,
        anonymous: &str,
        partition: i32,
    ) -> Result<bool, StoreError> {
        if !self.partitioned {
            return Ok(true);
        }
        let anon = self.user_key(anonymous);
        if let std::collections::hash_map::Entry::Vacant(e) = stamps.entry(anon) {
            // kept in the working set: a joined visitor's retirement is logged with its stamp
            let Some(stamp) = users_t
                .get(anon.0.as_slice())?
                .map(|g| partitions::stamp_of(g.value()))
                .transpose()?
                .flatten()
            else {
                return Ok(false);
            };
            e.insert(stamp);
        }
        Ok(stamps.get(&anon).is_some_and(|s| s.partition == partition))
    }
}

/// Brings `key`'s stamp into a batch's working set. A stamp of another partition (the topics'
/// partition count changed, moving the user) starts over on `partition`.
fn load_stamp<'a>(
    stamps: &'a mut HashMap<UserKey, Stamp>,
    users_t: &redb::Table<&[u8], &[u8]>,
    key: UserKey,
    partition: i32,
) -> Result<&'a mut Stamp, StoreError> {
    if let std::collections::hash_map::Entry::Vacant(v) = stamps.entry(key) {
        let stored = match users_t.get(key.0.as_slice())? {
            Some(g) => partitions::stamp_of(g.value())?,
            None => None,
        };
        v.insert(stored.unwrap_or_default());
    }
    let stamp = stamps.get_mut(&key).expect("inserted above");
    if stamp.partition != partition || stamp.next.is_empty() {
        *stamp = Stamp {
            partition,
            next: Vec::new(),
            epoch: stamp.epoch,
        };
    }
    Ok(stamp)
}

/// Brings `key`'s state into a batch's working set: (state, version before, oldest event
/// time, oldest broker time).
fn load(
    users: &mut Loaded,
    users_t: &redb::Table<&[u8], &[u8]>,
    key: UserKey,
) -> Result<(), StoreError> {
    if let std::collections::hash_map::Entry::Vacant(v) = users.entry(key) {
        let state = match users_t.get(key.0.as_slice())? {
            Some(g) => partitions::state_of(g.value())?,
            None => UserState::fresh(&key),
        };
        let version = state.current_version();
        v.insert((state, version, u64::MAX, u64::MAX));
    }
    Ok(())
}

/// Erases `key` at `at_ms` within a write transaction: (the erasure's version, whether
/// anything changed). What of the reorder window arrived after `at_ms` is folded on the
/// tombstone again ([`UserState::erased_at`]), above that version. The stamp stays, with the
/// epoch of this instance's ownership when it owns the user's partition (`owned_epochs`): the
/// owner wrote this state.
fn erase_in(
    users_t: &mut redb::Table<&[u8], &[u8]>,
    outbox_t: &mut redb::Table<&[u8; 12], Pending>,
    key: UserKey,
    at_ms: u64,
    at_least: Option<u64>,
    window: Window,
    owned_epochs: &BTreeMap<i32, u64>,
) -> Result<(u64, bool), StoreError> {
    // the stamp stays: an erasure is not input of the user's partition
    let (old, stamp): (Option<UserState>, Vec<u8>) = match users_t.get(key.0.as_slice())? {
        Some(g) => {
            let (stamp, state) = partitions::split_user(g.value())?;
            (Some(UserState::decode(state)?), stamp.to_vec())
        }
        None => (None, Vec::new()),
    };
    let had = old.as_ref().map_or(0, UserState::current_version);
    let at_least = at_least.unwrap_or(0);
    // An erasure at or before the last one's time covers nothing that erasure did not: what
    // the user did since is newer than both. So a replayed or retried request (its time is the
    // time it was signed), or the erasure log read again, changes nothing, even after a restart.
    // Unless the edge wrote a tombstone above what this holds: a second erasure in the same
    // second has the first one's time, and the edge made it a new epoch (as it does every
    // erasure); left below it, every later version from here would sit under the edge's
    // tombstone, read there as a duplicate.
    let last = old.as_ref().and_then(UserState::erased).map(|(_, at)| at);
    if last.is_some_and(|at| at_ms <= at) && at_least <= had {
        return Ok((had, false));
    }
    let at_ms = last.map_or(at_ms, |at| at.max(at_ms));
    // the next erasure epoch: the version the edge's own tombstone has (see `EPOCH_SHIFT`),
    // or the edge's, where it erased more often than reached here (its pending record of the
    // first of two erasures replaced by the second's before origin took it)
    let version = shared::delta::tombstone_version(had).max(at_least);
    let state = match &old {
        Some(old) => old.erased_at(&key, version, at_ms, window),
        None => UserState::tombstone(&key, version, at_ms),
    };
    let stamp = partitions::restamp(&stamp, owned_epochs)?;
    users_t.insert(
        key.0.as_slice(),
        partitions::user_value_raw(&stamp, &state.encode()).as_slice(),
    )?;
    // merged: an older change still pending keeps its stored time (the changelog's
    // acknowledged watermark must not pass it)
    let pending = match outbox_t.get(&key.0)? {
        Some(g) => g.value().merge(at_ms, at_ms),
        None => Pending::at(at_ms, at_ms),
    };
    outbox_t.insert(&key.0, pending)?;
    Ok((version, true))
}

/// One record of the erasure log: where it is, and the erasure (`None`: unreadable, only the
/// offset moves).
#[derive(Clone, Debug)]
pub struct ErasureRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub erasure: Option<shared::protocol::KeyErasureBody>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::Profile;
    use shared::catalog::Catalog;
    use shared::delta::Change;
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

    fn records(events: &[Event], topic: &str, start: i64) -> Vec<Record> {
        events
            .iter()
            .enumerate()
            .map(|(i, e)| Record {
                topic: topic.into(),
                partition: 0,
                offset: start + i as i64,
                event: Some(e.clone()),
                arrived_ms: None,
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

    /// A window small enough that test traffic freezes events out of it.
    const SMALL_WINDOW: Window = Window {
        reorder_ms: 1000,
        max_events: 8,
    };

    /// The outbox knows when its oldest pending change was stored, on the monotonic clock
    /// the changelog's watermark samples are read on; a merge keeps the oldest.
    #[test]
    fn the_outbox_says_when_its_oldest_pending_change_was_stored() {
        let store = open("oldest-stored", SMALL_WINDOW);
        assert_eq!(store.outbox_oldest_stored(0).expect("empty"), None);
        let catalog = Catalog::demo().expect("demo");
        let events: Vec<Event> = Traffic::new(&catalog, 3, "o", 1_732_960_000_000, 10, 5)
            .take(40)
            .collect();
        let recs = records(&events, "a", 0);
        let before = crate::clock::monotonic_ms();
        store.apply_batch(&recs[..20]).expect("first");
        let after_first = crate::clock::monotonic_ms();
        std::thread::sleep(std::time::Duration::from_millis(5));
        store.apply_batch(&recs[20..]).expect("second");
        let oldest = store
            .outbox_oldest_stored(0)
            .expect("oldest")
            .expect("pending");
        assert!(
            (before..=after_first).contains(&oldest),
            "{oldest} not within the first batch's {before}..={after_first}"
        );
    }

    fn outbox_keys(store: &Store) -> Vec<UserKey> {
        store
            .outbox()
            .expect("outbox")
            .into_iter()
            .map(|k| k.0)
            .collect()
    }

    #[test]
    fn outbox_coalesces_and_acknowledges() {
        let catalog = Catalog::demo().expect("demo");
        let events: Vec<Event> = Traffic::new(&catalog, 3, "o", 1_732_960_000_000, 10, 5)
            .take(60)
            .collect();
        let store = open("outbox", SMALL_WINDOW);
        store.apply_batch(&records(&events, "a", 0)).expect("batch");
        let keys = outbox_keys(&store);
        assert!(keys.len() <= 3);
        let items = store.prepare(SINK, &keys).expect("prepare");
        assert_eq!(items.len(), keys.len());
        assert!(
            items
                .iter()
                .all(|i| matches!(i.delta.change, Change::Snapshot(_)))
        );
        let settled = settle(&store, SINK, &[SINK], &items, &[]);
        assert!(settled.still.is_empty());
        assert_eq!(settled.retired.len(), items.len());
        assert_eq!(store.outbox_len().expect("len"), 0);
        // more events: patches from the acknowledged version
        let more: Vec<Event> = Traffic::new(&catalog, 3, "o", 1_732_960_100_000, 10, 6)
            .take(30)
            .collect();
        store.apply_batch(&records(&more, "a", 60)).expect("batch");
        let keys = outbox_keys(&store);
        let items = store.prepare(SINK, &keys).expect("prepare");
        for i in &items {
            let Change::Patch { from, .. } = i.delta.change else {
                panic!("expected a patch, got {:?}", i.delta.change)
            };
            assert!(from > 0);
        }
        // a resend request turns the next change into a snapshot
        let first = items[0].delta.user;
        let settled = settle(&store, SINK, &[SINK], &items, &[first]);
        assert_eq!(settled.still, vec![first]);
        let again = store.prepare(SINK, &[first]).expect("prepare");
        assert!(matches!(again[0].delta.change, Change::Snapshot(_)));
    }

    /// Freshness starts when the broker took the event, not at the time the event claims (a
    /// browser an hour ahead would make it read negative, one behind, an hour late); the
    /// event's own time is kept apart.
    #[test]
    fn retired_entries_say_when_the_broker_took_their_oldest_event() {
        let catalog = Catalog::demo().expect("demo");
        let events: Vec<Event> = Traffic::new(&catalog, 1, "f", 1_732_960_000_000, 10, 5)
            .take(3)
            .collect();
        let store = open("freshness-broker", SMALL_WINDOW);
        let mut recs = records(&events, "a", 0);
        for (i, r) in recs.iter_mut().enumerate() {
            // the browser's clock is an hour ahead of the broker's
            r.arrived_ms = r.event.as_ref().map(|e| e.ts_ms - 3_600_000 + i as u64);
        }
        store.apply_batch(&recs).expect("batch");
        let keys = outbox_keys(&store);
        let items = store.prepare(SINK, &keys).expect("prepare");
        let settled = settle(&store, SINK, &[SINK], &items, &[]);
        let oldest_event = events.iter().map(|e| e.ts_ms).min().expect("events");
        let oldest_broker = recs
            .iter()
            .filter_map(|r| r.arrived_ms)
            .min()
            .expect("times");
        assert_eq!(
            settled.retired,
            vec![(
                keys[0],
                Oldest {
                    event_ms: oldest_event,
                    broker_ms: oldest_broker,
                }
            )]
        );
    }

    /// The outbox entries of every earlier layout decode (the upgrade to layout 4 reads them:
    /// `layout::tests`), the event time standing in for the broker's where it was not kept;
    /// an entry in fixed-width rows reads back as written.
    #[test]
    fn an_outbox_entry_of_every_layout_is_read() {
        let pending = Pending::decode(&encode(&1_700_000_000_123u64)).expect("layout 1");
        assert_eq!(
            pending.oldest(),
            Oldest {
                event_ms: 1_700_000_000_123,
                broker_ms: 1_700_000_000_123
            }
        );
        let two = Pending::decode(&encode(&(5u64, 7u64))).expect("layout 2");
        assert_eq!(
            (
                two.oldest_ts_ms,
                two.oldest_arrived_ms,
                two.oldest_stored_ms
            ),
            (5, 7, 0)
        );
        let now = Pending::decode(&encode(&Pending::at(5, 7))).expect("with the stored time");
        assert_eq!((now.oldest_ts_ms, now.oldest_arrived_ms), (5, 7));
        assert!(now.oldest_stored_ms > 0);
        let row = <Pending as redb::Value>::as_bytes(&now);
        let back = <Pending as redb::Value>::from_bytes(&row);
        assert_eq!(
            (
                back.oldest_ts_ms,
                back.oldest_arrived_ms,
                back.oldest_stored_ms
            ),
            (5, 7, now.oldest_stored_ms)
        );
    }

    const SINK: &str = "edge";

    fn settle(
        store: &Store,
        sink: &str,
        sinks: &[&str],
        acked: &[OutItem],
        resend: &[UserKey],
    ) -> Settled {
        let sinks: Vec<String> = sinks.iter().map(|s| (*s).to_owned()).collect();
        let report = SinkReport {
            acked,
            resend,
            ..SinkReport::default()
        };
        store.settle(sink, &sinks, &report, 0).expect("settle")
    }

    /// A zombie and its partition's new owner, simulated with two stores: from one shared
    /// version each folds a different event into the same next version, the zombie's
    /// reaches the edge first, the owner's is a duplicate there (acknowledged), and the
    /// owner's next patch is made from its own content at that version. The edge's rules
    /// (`delta::apply`, as `/v1/sync` runs them: a duplicate is acknowledged, a gap answered
    /// "resend") must end with the owner's profile, not a patch applied onto the zombie's.
    #[test]
    fn an_owners_patch_is_not_applied_onto_a_zombies_profile_of_the_same_version() {
        use shared::delta::{Applied, ApplyError, apply};
        let event = |id: &str, ts: u64, body: &str| {
            shared::event::parse_event(
                format!(r#"{{"event_id":"{id}","user_id":"z","ts":{ts},{body}}}"#).as_bytes(),
            )
            .expect("valid")
        };
        let first = event("e1", 1_764_000_001_000, r#""type":"page_view""#);
        let zombies = event(
            "e2",
            1_764_000_002_000,
            r#""type":"add_to_cart","item":"cam-001","category":"cameras","price":499"#,
        );
        let owners = event(
            "e3",
            1_764_000_003_000,
            r#""type":"product_view","item":"sd-128","category":"storage""#,
        );
        let window = Window {
            reorder_ms: 0,
            max_events: 0,
        };
        let (zombie, owner) = (open("zombie-a", window), open("zombie-b", window));
        let mut edge: Option<Stored> = None;
        // the edge's answer to one prepared change: acknowledged, or "resend"
        let send = |store: &Store, edge: &mut Option<Stored>| -> Result<Applied, ApplyError> {
            let items = store.prepare(SINK, &outbox_keys(store)).expect("prepare");
            assert_eq!(items.len(), 1);
            let outcome = apply(edge, &items[0].delta.change);
            let resend: Vec<UserKey> = match outcome {
                Err(ApplyError::Gap { .. }) => vec![items[0].delta.user],
                _ => Vec::new(),
            };
            // as the sender reports a sync reply: the batch answered, with its resend list
            settle(store, SINK, &[SINK], &items, &resend);
            outcome
        };
        for store in [&zombie, &owner] {
            store
                .apply_batch(&records(std::slice::from_ref(&first), "a", 0))
                .expect("batch");
        }
        assert_eq!(send(&zombie, &mut edge), Ok(Applied::Updated));
        assert_eq!(send(&owner, &mut edge), Ok(Applied::Duplicate));

        // the same version, different events
        zombie
            .apply_batch(&records(std::slice::from_ref(&zombies), "a", 1))
            .expect("batch");
        owner
            .apply_batch(&records(std::slice::from_ref(&owners), "b", 0))
            .expect("batch");
        assert_eq!(send(&zombie, &mut edge), Ok(Applied::Updated));
        assert_eq!(send(&owner, &mut edge), Ok(Applied::Duplicate));
        assert_ne!(
            zombie.current("z").expect("read"),
            owner.current("z").expect("read")
        );

        // the owner folds the zombie's event too; its patch from its own version 2 is refused
        owner
            .apply_batch(&records(std::slice::from_ref(&zombies), "a", 1))
            .expect("batch");
        let patch = owner.prepare(SINK, &outbox_keys(&owner)).expect("prepare");
        let Change::Patch {
            from,
            steps,
            advance,
            ref ops,
            ..
        } = patch[0].delta.change
        else {
            panic!("expected a patch: {:?}", patch[0].delta.change)
        };
        // without the digest (wire format 2) the patch would apply onto the zombie's content
        let mut unchecked = edge.clone();
        let blind = Change::Patch {
            from,
            steps,
            advance,
            base: None,
            ops: ops.clone(),
        };
        assert_eq!(apply(&mut unchecked, &blind), Ok(Applied::Updated));
        assert_ne!(unchecked, owner.current("z").expect("read"));
        // with it the edge answers "resend", and the snapshot that follows is the owner's
        assert!(matches!(
            send(&owner, &mut edge),
            Err(ApplyError::Gap { .. })
        ));
        assert_eq!(send(&owner, &mut edge), Ok(Applied::Updated));
        assert_eq!(edge, owner.current("z").expect("read"));
    }

    /// An erasure of a shopper whose change is still pending keeps that change's stored time
    /// (the changelog's acknowledged watermark must not pass it).
    #[test]
    fn an_erasure_keeps_a_pending_changes_stored_time() {
        let catalog = Catalog::demo().expect("demo");
        let events: Vec<Event> = Traffic::new(&catalog, 1, "x", 1_732_960_000_000, 10, 3)
            .take(5)
            .collect();
        let store = open("erase-pending", SMALL_WINDOW);
        store.apply_batch(&records(&events, "a", 0)).expect("batch");
        let stored = store.outbox_oldest_stored(0).expect("oldest");
        assert!(stored.is_some());
        std::thread::sleep(std::time::Duration::from_millis(5));
        let (_, _, erased) = store
            .erase(&events[0].user, crate::clock::now_ms())
            .expect("erase");
        assert!(erased);
        assert_eq!(store.outbox_len().expect("len"), 1);
        assert_eq!(store.outbox_oldest_stored(0).expect("oldest"), stored);
    }

    /// With several instances, a quarantined change put back by `replay` is logged again:
    /// the changelog's acknowledged watermark took it for settled, and its new record lies
    /// above the watermark, so a new owner sends it too.
    #[test]
    fn a_requeued_quarantined_change_is_logged_again_where_partitions_move() {
        let catalog = Catalog::demo().expect("demo");
        let events: Vec<Event> = Traffic::new(&catalog, 2, "r", 1_732_960_000_000, 10, 7)
            .take(20)
            .collect();
        let store = open("requeue-logged", SMALL_WINDOW).partitioned();
        store.set_owned(&[0]);
        let outcome = store.apply_batch(&records(&events, "a", 0)).expect("batch");
        let marks: Vec<(UserKey, u64)> =
            outcome.logged.iter().map(|l| (l.key, l.version)).collect();
        store.mark_logged(&marks).expect("logged");
        assert!(store.unlogged_keys().expect("unlogged").is_empty());
        let keys = outbox_keys(&store);
        let items = store.prepare("kv", &keys).expect("prepare");
        assert_eq!(items.len(), 2);
        let quarantined = [(
            items[0].clone(),
            "http_413".to_owned(),
            "too big".to_owned(),
        )];
        let report = SinkReport {
            acked: &items[1..],
            quarantined: &quarantined,
            ..SinkReport::default()
        };
        store
            .settle("kv", &["kv".to_owned()], &report, 5)
            .expect("settle");
        assert_eq!(store.outbox_len().expect("len"), 0);
        assert_eq!(
            store.requeue_quarantined(|_, _| true, 9).expect("requeue"),
            1
        );
        assert_eq!(
            store.unlogged_keys().expect("unlogged"),
            [items[0].delta.user].into_iter().collect()
        );
    }

    /// Each sink progresses on its own: an entry leaves the outbox only when every sink
    /// acknowledged or quarantined its user, and a quarantined change can be put back.
    #[test]
    fn sinks_progress_apart_and_quarantine_can_be_replayed() {
        let catalog = Catalog::demo().expect("demo");
        let events: Vec<Event> = Traffic::new(&catalog, 2, "q", 1_732_960_000_000, 10, 7)
            .take(20)
            .collect();
        let store = open("sinks", SMALL_WINDOW);
        store.apply_batch(&records(&events, "a", 0)).expect("batch");
        let keys = outbox_keys(&store);
        assert_eq!(keys.len(), 2);
        let both = ["edge", "kv"].map(String::from);
        let edge_items = store.prepare("edge", &keys).expect("prepare");
        let settled = settle(&store, "edge", &["edge", "kv"], &edge_items, &[]);
        assert!(settled.still.is_empty());
        assert!(settled.retired.is_empty(), "kv has not acknowledged");
        assert!(store.prepare("edge", &keys).expect("prepare").is_empty());
        assert_eq!(outbox_keys(&store).len(), 2);
        // kv acknowledges one and quarantines the other
        let kv_items = store.prepare("kv", &keys).expect("prepare");
        assert_eq!(kv_items.len(), 2);
        let bad = kv_items[1].clone();
        let quarantined = [(bad.clone(), "http_413".to_owned(), "too big".to_owned())];
        let report = SinkReport {
            acked: &kv_items[..1],
            quarantined: &quarantined,
            ..SinkReport::default()
        };
        let settled = store.settle("kv", &both, &report, 5).expect("settle");
        assert_eq!(settled.retired.len(), 2);
        assert_eq!(store.outbox_len().expect("len"), 0);
        let listed = store.quarantined().expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].1.subject, Subject::User(bad.delta.user));
        assert_eq!(listed[0].1.reason, "http_413");
        // replayed: back in the outbox, for kv only, as a snapshot
        let n = store
            .requeue_quarantined(|_, r| r.sink == "kv", 9)
            .expect("requeue");
        assert_eq!(n, 1);
        assert!(store.quarantined().expect("list").is_empty());
        assert_eq!(outbox_keys(&store), vec![bad.delta.user]);
        assert!(
            store
                .prepare("edge", &[bad.delta.user])
                .expect("prepare")
                .is_empty()
        );
        let again = store.prepare("kv", &[bad.delta.user]).expect("prepare");
        assert!(matches!(again[0].delta.change, Change::Snapshot(_)));
        // paging through the outbox
        store.apply_batch(&records(&events, "b", 0)).expect("batch");
        let first = store.outbox_page(None, 1).expect("page");
        assert_eq!(first.len(), 1);
        let rest = store.outbox_page(Some(first[0]), 10).expect("page");
        assert!(!rest.contains(&first[0]));
    }

    #[test]
    fn erasure_wins_over_older_events() {
        let catalog = Catalog::demo().expect("demo");
        let events: Vec<Event> = Traffic::new(&catalog, 1, "e", 1_732_960_000_000, 10, 5)
            .take(10)
            .collect();
        let store = open("erase", SMALL_WINDOW);
        store.apply_batch(&records(&events, "a", 0)).expect("batch");
        let (_, v, _) = store.erase("e-u0", 1_732_960_000_050).expect("erase");
        // the next erasure epoch, above all ten versions (and any origin had not delivered)
        let epoch1 = 1u64 << shared::delta::EPOCH_SHIFT;
        assert_eq!(v, epoch1);
        assert_eq!(
            store.current("e-u0").expect("read"),
            Some(Stored::Tombstone { version: epoch1 })
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
            Some(Stored::Profile(p)) => assert_eq!(p.version, epoch1 + 1),
            other => panic!("{other:?}"),
        }
        // the same erasure again (a replay, or a retry whose answer was lost) changes nothing:
        // the newer event's profile stays
        assert_eq!(
            store.erase("e-u0", 1_732_960_000_050).expect("erase").1,
            epoch1 + 1
        );
        assert!(matches!(
            store.current("e-u0").expect("read"),
            Some(Stored::Profile(_))
        ));
        // a later erasure erases it
        assert_eq!(
            store.erase("e-u0", 1_732_960_002_000).expect("erase").1,
            2 * epoch1
        );
    }

    /// The edge makes every erasure a new epoch; a second one in the same second has the first
    /// one's cutoff. Told the edge's tombstone version, origin reaches it, so the edge does not
    /// hold a tombstone every later version from origin sits under; the same erasure again (a
    /// retry, the log read again) still changes nothing.
    #[test]
    fn a_second_erasure_in_the_same_second_reaches_the_edges_tombstone() {
        let epoch = |n: u64| n << shared::delta::EPOCH_SHIFT;
        let store = open("erase-twice", SMALL_WINDOW);
        let key = store.user_key("twice");
        let at = 1_732_960_000_999;
        assert_eq!(
            store.erase_key(key, at, Some(epoch(1))).unwrap().1,
            epoch(1)
        );
        let (_, v, changed) = store.erase_key(key, at, Some(epoch(2))).unwrap();
        assert_eq!(
            (v, changed),
            (epoch(2), true),
            "the edge's second tombstone"
        );
        assert_eq!(
            store.current("twice").unwrap(),
            Some(Stored::Tombstone { version: epoch(2) })
        );
        for retry in [Some(epoch(2)), Some(epoch(1)), None] {
            assert_eq!(
                store.erase_key(key, at, retry).unwrap(),
                (key, epoch(2), false),
                "{retry:?}"
            );
        }
        // an edge that erased twice before origin heard of either (its pending record of the
        // first replaced by the second's): one erasure here, at the edge's version
        let other = store.user_key("twice-offline");
        assert_eq!(
            store
                .erase_key(other, at + 5_000, Some(epoch(2)))
                .unwrap()
                .1,
            epoch(2)
        );
        // and a lagging edge's version is no floor: origin's own next epoch
        assert_eq!(
            store
                .erase_key(other, at + 9_000, Some(epoch(1)))
                .unwrap()
                .1,
            epoch(3)
        );
        // an erasure's time never moves back: a same-second repeat keeps the cutoff
        assert_eq!(
            store.erase_key(key, at - 10, Some(epoch(3))).unwrap().1,
            epoch(3)
        );
        let late = shared::event::parse_event(
            br#"{"event_id":"late","user_id":"twice","ts":1732960000999,"type":"page_view"}"#,
        )
        .unwrap();
        let applied = store.apply_batch(&records(&[late], "a", 0)).unwrap();
        assert_eq!(
            applied.erased, 1,
            "an event at the first cutoff stays erased"
        );
    }

    /// Identity stitching: a visitor's cart of two items joins the profile they sign in to,
    /// once — whether the sign-in event is redelivered, or the shopper signs in again — and
    /// the visitor's own profile is retired.
    #[test]
    fn a_sign_in_joins_the_visitors_profile_once() {
        let ev = |id: &str, user: &str, dt: u64, body: &str| {
            shared::event::parse_event(
                format!(
                    r#"{{"event_id":"{id}","user_id":"{user}","ts":{},{body}}}"#,
                    1_732_960_000_000 + dt * 1000
                )
                .as_bytes(),
            )
            .expect("event")
        };
        let add = |id: &str, user: &str, dt: u64, item: &str| {
            ev(
                id,
                user,
                dt,
                &format!(
                    r#""type":"add_to_cart","item":"{item}","category":"cameras","price":100,"quantity":1"#
                ),
            )
        };
        let visitor = "v-00112233445566778899aabbccddeeff";
        let identify = |id: &str, dt: u64| {
            ev(
                id,
                "alice",
                dt,
                &format!(r#""type":"identify","anonymous_id":"{visitor}""#),
            )
        };
        let store = open("identify", SMALL_WINDOW);
        store
            .apply_batch(&records(
                &[
                    add("a1", visitor, 1, "cam-001"),
                    add("a2", visitor, 2, "sd-128"),
                    add("s1", "alice", 3, "tri-001"),
                ],
                "c",
                0,
            ))
            .expect("batch");
        let cart = |store: &Store| match store.current("alice").expect("read") {
            Some(Stored::Profile(p)) => {
                let mut c: Vec<(u32, u16)> =
                    p.cart.iter().map(|l| (l.item.0, l.quantity)).collect();
                c.sort();
                c
            }
            other => panic!("{other:?}"),
        };
        let out = store
            .apply_batch(&records(&[identify("sign-in-1", 4)], "c", 3))
            .expect("batch");
        assert_eq!(out.identified, 1);
        let want: Vec<(u32, u16)> = {
            let mut w: Vec<(u32, u16)> = ["cam-001", "sd-128", "tri-001"]
                .iter()
                .map(|s| (shared::ids::ItemId::of_sku(s).0, 1))
                .collect();
            w.sort();
            w
        };
        assert_eq!(cart(&store), want, "both visitor items joined, once");
        assert!(matches!(
            store.current(visitor).expect("read"),
            Some(Stored::Tombstone { .. })
        ));
        // redelivered (another copy of the same event), and a second sign-in later
        let out = store
            .apply_batch(&records(&[identify("sign-in-1", 4)], "d", 0))
            .expect("batch");
        assert_eq!((out.duplicates, out.identified), (1, 0));
        store
            .apply_batch(&records(&[identify("sign-in-2", 20)], "c", 4))
            .expect("batch");
        assert_eq!(cart(&store), want, "still once");
        // the visitor browsing on after the sign-in starts afresh; nothing is dropped
        store
            .apply_batch(&records(&[add("a3", visitor, 30, "bag-001")], "c", 5))
            .expect("batch");
        assert!(matches!(
            store.current(visitor).expect("read"),
            Some(Stored::Profile(p)) if p.cart.len() == 1
        ));
    }

    /// A visitor erased earlier, then signed in: retiring the visitor keeps that erasure's
    /// cutoff, so an event from before the erasure that arrives late is still dropped.
    #[test]
    fn a_sign_in_keeps_the_visitors_earlier_erasure_cutoff() {
        let t0 = 1_732_960_000_000;
        let visitor = "v-00112233445566778899aabbccddeeff";
        let event = |id: &str, user: &str, secs: u64, body: &str| {
            let json = format!(
                r#"{{"event_id":"{id}","user_id":"{user}","ts":{},{body}}}"#,
                t0 + secs * 1000
            );
            shared::event::parse_event(json.as_bytes()).expect("event")
        };
        let store = open("identify-erased", SMALL_WINDOW);
        store.erase(visitor, t0 + 10_000).expect("erase");
        let view = r#""type":"page_view""#;
        let signed_in = format!(r#""type":"identify","anonymous_id":"{visitor}""#);
        let batch = [
            event("after", visitor, 20, view),
            event("in", "alice", 30, &signed_in),
        ];
        let out = store.apply_batch(&records(&batch, "c", 0)).expect("batch");
        assert_eq!(out.identified, 1);
        let late = [event("before", visitor, 5, view)];
        let out = store.apply_batch(&records(&late, "c", 2)).expect("batch");
        assert_eq!(out.erased, 1, "an event from before the erasure is dropped");
        assert!(matches!(
            store.current(visitor).expect("read"),
            Some(Stored::Tombstone { .. })
        ));
    }

    /// The cutoff is origin-side time (when the broker took the event), never the browser's
    /// clock: events taken before the erasure are dropped even when their browser time runs an
    /// hour ahead of it, and an event taken after it is kept even when its browser clock is an
    /// hour behind.
    #[test]
    fn the_erasure_cutoff_is_arrival_time_not_browser_time() {
        let catalog = Catalog::demo().expect("demo");
        let t0 = 1_732_960_000_000;
        let hour = 3_600_000;
        let events: Vec<Event> = Traffic::new(&catalog, 1, "h", t0, 10, 9).take(6).collect();
        let store = open("arrival", SMALL_WINDOW);
        let erased_at = t0 + 1_000;
        store.erase("h-u0", erased_at).expect("erase");
        let at = |evs: &[Event], start: i64, arrived: u64, shift: i64| -> Vec<Record> {
            let mut recs = records(evs, "a", start);
            for r in &mut recs {
                r.arrived_ms = Some(arrived);
                if let Some(e) = r.event.as_mut() {
                    e.ts_ms = e.ts_ms.saturating_add_signed(shift);
                }
            }
            recs
        };
        // taken before the erasure (consumed after it), browser clock an hour ahead: dropped
        let early = store
            .apply_batch(&at(&events[..3], 0, erased_at - 10, hour))
            .expect("batch");
        assert_eq!(early.erased, 3, "{early:?}");
        assert!(matches!(
            store.current("h-u0").expect("read"),
            Some(Stored::Tombstone { .. })
        ));
        // taken after it, browser clock an hour behind: a new profile
        let later = store
            .apply_batch(&at(&events[3..], 3, erased_at + 10, -hour))
            .expect("batch");
        assert_eq!((later.erased, later.applied), (0, 3), "{later:?}");
        assert!(matches!(
            store.current("h-u0").expect("read"),
            Some(Stored::Profile(_))
        ));
    }

    /// An erasure that reaches the store after events that arrived after its cutoff were
    /// folded (the erasure log's follower lagging) keeps those events: the shopper's profile
    /// is the one an on-time erasure would have left, above the erasure's version, and what
    /// arrived before the cutoff is gone.
    #[test]
    fn an_erasure_applied_late_keeps_what_arrived_after_its_cutoff() {
        let catalog = Catalog::demo().expect("demo");
        let t0 = 1_732_960_000_000;
        let events: Vec<Event> = Traffic::new(&catalog, 1, "l", t0, 10, 13).take(6).collect();
        let cutoff = t0 + 100_000;
        let arriving = |evs: &[Event], start: i64, arrived: u64| -> Vec<Record> {
            let mut recs = records(evs, "a", start);
            for r in &mut recs {
                r.arrived_ms = Some(arrived);
            }
            recs
        };
        let late = open("late-erasure", SMALL_WINDOW);
        late.apply_batch(&arriving(&events[..3], 0, cutoff - 10))
            .expect("batch");
        late.apply_batch(&arriving(&events[3..], 3, cutoff + 10))
            .expect("batch");
        let (_, version, changed) = late.erase("l-u0", cutoff).expect("erase");
        assert!(changed);

        let on_time = open("on-time-erasure", SMALL_WINDOW);
        on_time
            .apply_batch(&arriving(&events[..3], 0, cutoff - 10))
            .expect("batch");
        on_time.erase("l-u0", cutoff).expect("erase");
        on_time
            .apply_batch(&arriving(&events[3..], 3, cutoff + 10))
            .expect("batch");
        let (late, on_time) = (
            late.current("l-u0").expect("read"),
            on_time.current("l-u0").expect("read"),
        );
        assert_eq!(late, on_time);
        match late {
            Some(Stored::Profile(p)) => assert_eq!(p.version, version + 3),
            other => panic!("{other:?}"),
        }
    }

    /// A document held through a wait is still to be sent only at its current version, and
    /// only by the publisher: not after a newer version replaced it, nor once partition 0
    /// (publication) moved to another instance.
    #[test]
    fn a_held_document_goes_only_at_its_current_version_from_the_publisher() {
        use shared::wire::ConfigKind::Erasures;
        let store = open("held-documents", SMALL_WINDOW).partitioned();
        store.set_owned(&[0, 1]);
        let fence_version = |store: &Store| {
            store
                .pending_documents("kv")
                .expect("documents")
                .into_iter()
                .find(|d| d.kind == Erasures)
                .map(|d| d.version)
                .expect("a fence")
        };
        store.erase("alice", 1_732_960_000_000).expect("erase");
        let first = fence_version(&store);
        assert_eq!(
            store.current_documents(&[(Erasures, first)]).expect("read"),
            [true]
        );
        store.erase("bob", 1_732_960_000_001).expect("erase");
        let second = fence_version(&store);
        assert!(second > first);
        assert_eq!(
            store
                .current_documents(&[(Erasures, first), (Erasures, second)])
                .expect("read"),
            [false, true]
        );
        store.set_owned(&[1]);
        assert_eq!(
            store
                .current_documents(&[(Erasures, second)])
                .expect("read"),
            [false]
        );
    }

    /// Every erasure the store takes (from the edge, or read back from the erasure log) is in
    /// the erasure fence document it publishes, in the same transaction; a repeat changes
    /// neither the fence nor its version.
    #[test]
    fn erasures_are_published_in_the_fence() {
        use shared::fence::ErasureFence;
        use shared::wire::ConfigKind;
        let store = open("fence", SMALL_WINDOW);
        let fence_of = |store: &Store| {
            store
                .pending_documents("edge")
                .expect("documents")
                .into_iter()
                .find(|d| d.kind == ConfigKind::Erasures)
                .map(|d| {
                    (
                        d.version,
                        ErasureFence::from_json(&d.source).expect("parses"),
                    )
                })
        };
        assert_eq!(fence_of(&store), None);
        let (alice, t, _) = store.erase("alice", 1_732_960_000_000).expect("erase");
        let (version, fence) = fence_of(&store).expect("published");
        assert_eq!((version, fence.floor(&alice)), (1, Some(t)));
        store.erase("alice", 1_732_960_000_000).expect("repeat");
        assert_eq!(fence_of(&store).expect("published").0, 1);
        let bob = store.user_key("bob");
        let changed = store
            .apply_erasures(&[ErasureRecord {
                topic: "erasures".into(),
                partition: 0,
                offset: 0,
                erasure: Some(shared::protocol::KeyErasureBody {
                    user_key: bob,
                    erased_at_ms: 1_732_960_001_000,
                    tombstone_version: None,
                }),
            }])
            .expect("log");
        assert_eq!(changed, vec![bob]);
        let (version, fence) = fence_of(&store).expect("published");
        assert_eq!(version, 2);
        assert_eq!(fence.len(), 2);
        assert_eq!(fence.floor(&bob), Some(1 << shared::delta::EPOCH_SHIFT));
    }
}
