//! The in-isolate profile cache: an LRU bounded by bytes as well as by entries.
//!
//! Entries hold the profile *encoded* (the shared stored format, ~150 bytes), not as a decoded
//! struct with its own heap vectors: that keeps 10k profiles within a few megabytes and makes
//! the byte bound exact. Decoding one on use costs about a microsecond.
//!
//! Each entry has two layers:
//! * the **base**: what origin-sync last published (through `/v1/sync` or KV), with its version
//!   and the time it was fetched. Versions only move forward; a patch that does not fit the
//!   held version drops the entry so the next request refetches the snapshot from KV;
//! * the **local events**: the shopper's own events accepted at this edge and not yet seen in
//!   the base (read-your-writes). They are folded over the base when the profile is read and
//!   dropped once a base at least as new as their time arrives.

use lru::LruCache;
use shared::delta::{self, Applied, Change, Stored};
use shared::event::Event;
use shared::fold::fold;
use shared::ids::Secs;
use shared::keys::UserKey;
use shared::profile::{EventTag, Profile};
use shared::session;
use shared::wire;

/// Bookkeeping per entry besides its payload: key, timestamps, the session records it is known
/// to show, LRU links, map slot, allocator rounding. About 160 bytes measured natively
/// (`benches/cache_memory.rs`); less on wasm32.
pub const ENTRY_OVERHEAD: usize = 160;
/// Most local events kept per shopper; older ones are dropped first (origin has them).
pub const MAX_LOCAL_EVENTS: usize = 32;
/// Session records recognised per entry (see `Entry::shown`).
const SHOWN_RECORDS: usize = 2;

#[derive(Debug)]
pub struct Entry {
    /// `encode_stored` bytes of the base; `None` if KV had nothing for this shopper.
    base: Option<Box<[u8]>>,
    version: u64,
    fetched_at_ms: u64,
    local: Vec<Event>,
    /// The base version the local events were taken over: a newer base holds at most as many
    /// of them as it advanced past it.
    local_since: u64,
    /// The session records (each one's tag, and when it was issued) known to show exactly
    /// this entry: issued from it, or checked equal to it; the latest first. Any change to the
    /// entry forgets them, so a browser echoing one needs neither the record decoded nor a new
    /// one signed. Two, not one: a shopper on two devices holds two records of the same
    /// entry (issued at different times), and with one slot each device's request would
    /// verify and adopt its record again, displacing the other's.
    shown: [Option<([u8; session::TAG_LEN], u64)>; SHOWN_RECORDS],
    bytes: usize,
}

impl Entry {
    fn new(stored: Option<&Stored>, fetched_at_ms: u64) -> Entry {
        let mut e = Entry {
            base: None,
            version: 0,
            fetched_at_ms,
            local: Vec::new(),
            local_since: 0,
            shown: [None; SHOWN_RECORDS],
            bytes: 0,
        };
        e.set_base(stored, fetched_at_ms);
        e
    }

    fn set_base(&mut self, stored: Option<&Stored>, fetched_at_ms: u64) {
        // Erasure wins: a newly arrived tombstone also erases the local events folded over an
        // older base (a tombstone carries no time to retire them by). Events taken over this
        // very tombstone (after the erasure) stay, however often it is read again.
        if let Some(Stored::Tombstone { version }) = stored
            && (*version > self.version || !self.is_tombstone())
            && *version > self.local_since
        {
            self.local.clear();
        }
        self.base = stored.map(|s| wire::encode_stored(s).into_boxed_slice());
        self.version = stored.map_or(0, Stored::version);
        self.fetched_at_ms = fetched_at_ms;
        if let Some(stored) = stored {
            let advanced = self.version.saturating_sub(self.local_since);
            retire(&mut self.local, advanced, stored.profile());
            self.local_since = self.version;
        }
        self.recount();
    }

    fn recount(&mut self) {
        self.bytes = ENTRY_OVERHEAD
            + self.base.as_ref().map_or(0, |b| b.len())
            + self.local.iter().map(local_event_bytes).sum::<usize>();
    }

    /// The base as origin published it (`None`: nothing known, or the bytes no longer decode).
    /// Whether a base (KV's or a sync's value) is held, without decoding it.
    pub fn has_base(&self) -> bool {
        self.base.is_some()
    }

    pub fn base(&self) -> Option<Stored> {
        self.base
            .as_deref()
            .and_then(|b| wire::decode_stored(b).ok())
    }

    /// Whether the session record with `tag` shows exactly this entry and is still within
    /// its age at `now_s`. Compared in constant time: the tag is a MAC.
    pub fn shows_record(&self, tag: &[u8; session::TAG_LEN], now_s: u64) -> bool {
        self.shown.iter().flatten().any(|(mine, issued_s)| {
            same_tag(mine, tag) && now_s.saturating_sub(*issued_s) <= session::MAX_AGE_S
        })
    }

    /// Whether what a KV read returned (`None`: no value) changes this entry: it replaces
    /// the base when its version is not older (a tombstone wins a tie with a profile of the
    /// same version), unless it is the very base, over which the local events were taken.
    fn changed_by_read(&self, stored: Option<&Stored>) -> bool {
        let version = stored.map_or(0, Stored::version);
        let tombstone_wins = version == self.version
            && matches!(stored, Some(Stored::Profile(_)))
            && self.is_tombstone();
        if version < self.version || tombstone_wins {
            return false;
        }
        let same = version == self.version
            && (stored.is_none() || self.local_since == version)
            && self.base.as_deref() == stored.map(wire::encode_stored).as_deref();
        !same
    }

    /// Whether a local event with this id is held (not yet in a base).
    fn holds_local(&self, id: &str) -> bool {
        self.local.iter().any(|l| l.id == id)
    }

    /// Whether a session record's base `b` replaces this entry's: it is newer, or a
    /// tombstone of the same version (erasure wins a tie).
    fn takes_base(&self, b: &Stored) -> bool {
        let tombstone_wins = b.version() == self.version
            && matches!(b, Stored::Tombstone { .. })
            && !self.is_tombstone();
        b.version() > self.version || tombstone_wins
    }

    /// Whether the base is a tombstone (the shopper was erased).
    pub fn is_tombstone(&self) -> bool {
        matches!(self.base(), Some(Stored::Tombstone { .. }))
    }

    /// The version of the base (0 when there is none).
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn fetched_at_ms(&self) -> u64 {
        self.fetched_at_ms
    }

    pub fn local_events(&self) -> usize {
        self.local.len()
    }

    /// What the shopper's pages see: the base with the local events folded over it.
    /// `None` when there is neither a profile nor a local event (or the base is a tombstone
    /// and nothing happened since).
    pub fn profile(&self, bucket: u8) -> Option<Profile> {
        let base = self.base().and_then(|s| match s {
            Stored::Profile(p) => Some(p),
            Stored::Tombstone { .. } => None,
        });
        if self.local.is_empty() {
            return base;
        }
        let mut p = base.unwrap_or_else(|| Profile::new(bucket));
        for e in &self.local {
            fold(&mut p, e);
        }
        Some(p)
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Whether two session record tags are equal, compared in constant time (a tag is a MAC).
fn same_tag(a: &[u8; session::TAG_LEN], b: &[u8; session::TAG_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Retires the local events a new base holds.
///
/// A base names the events it folded last (`Profile::folded`, newest first). When those tags
/// reach back over every event folded since the base the local events were taken over
/// (`advanced` versions, one per event), the answer is exact: an event whose tag is there is
/// held, one whose tag is not is not — whatever else (another channel's purchase in the same
/// second) moved the version. Only when more events came in between than tags are kept, or
/// the base predates the tags (wire format 1), does time decide: the base holds nothing after
/// its newest event's second and everything before it, and of those in that very second as
/// many retire, oldest first, as the version advanced less those of earlier seconds.
fn retire(local: &mut Vec<Event>, advanced: u64, base: Option<&Profile>) {
    let (tags, seen) = base.map_or((&[][..], Secs(0)), |p| (&p.folded[..], p.updated_at));
    if advanced <= tags.len() as u64 {
        let held: Vec<EventTag> = tags[..advanced as usize].to_vec();
        local.retain(|e| !held.contains(&EventTag::of(&e.id)));
        return;
    }
    let sec = |e: &Event| Secs::from_unix_ms(e.ts_ms).0;
    let earlier = local.iter().filter(|e| sec(e) < seen.0).count() as u64;
    let mut same: Vec<(u64, usize)> = local
        .iter()
        .enumerate()
        .filter(|(_, e)| sec(e) == seen.0)
        .map(|(i, e)| (e.ts_ms, i))
        .collect();
    shared::sort::sort_unstable(&mut same);
    let budget = usize::try_from(advanced.saturating_sub(earlier)).unwrap_or(usize::MAX);
    let gone: std::collections::BTreeSet<usize> =
        same.into_iter().take(budget).map(|(_, i)| i).collect();
    let mut i = 0;
    local.retain(|e| {
        let keep = sec(e) > seen.0 || (sec(e) == seen.0 && !gone.contains(&i));
        i += 1;
        keep
    });
}

fn local_event_bytes(e: &Event) -> usize {
    // everything a browser can make large: a purchase's lines are kilobytes
    std::mem::size_of::<Event>() + e.heap_bytes() + 48
}

/// What a sync change did to a cached entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheApply {
    NotCached,
    Applied(Applied),
    /// The change did not fit the cached version: the entry was dropped.
    Dropped,
}

#[derive(Debug)]
pub struct ProfileCache {
    lru: LruCache<UserKey, Entry>,
    max_bytes: usize,
    max_entries: usize,
    bytes: usize,
    /// Entries evicted to stay within the bounds, since the cache was made.
    evictions: u64,
}

impl ProfileCache {
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        ProfileCache {
            lru: LruCache::unbounded(),
            max_bytes,
            max_entries: max_entries.max(1),
            bytes: 0,
            evictions: 0,
        }
    }

    /// Entries evicted to stay within the bounds so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    pub fn len(&self) -> usize {
        self.lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }

    /// Bytes accounted to entries (payloads plus [`ENTRY_OVERHEAD`] each).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Looks an entry up and marks it recently used.
    pub fn get(&mut self, key: &UserKey) -> Option<&Entry> {
        self.lru.get(key).map(|e| e as &Entry)
    }

    pub fn peek(&self, key: &UserKey) -> Option<&Entry> {
        self.lru.peek(key)
    }

    pub fn remove(&mut self, key: &UserKey) -> Option<Entry> {
        let e = self.lru.pop(key)?;
        self.bytes -= e.bytes;
        Some(e)
    }

    /// Drops the base of `key` (its version no longer fits what origin sends) so the next read
    /// refetches it from KV, but keeps the shopper's local events: origin may not have them yet.
    pub fn drop_base(&mut self, key: &UserKey) {
        let keeps_events = self.lru.peek(key).is_some_and(|e| !e.local.is_empty());
        if !keeps_events {
            self.remove(key);
            return;
        }
        self.modify(*key, 0, |e| {
            e.base = None;
            e.version = 0;
            e.fetched_at_ms = 0; // past any TTL: the next lookup reads KV
        });
    }

    /// Records what KV returned for `key` (`None`: no value). Never moves a cached base
    /// backwards: KV is eventually consistent and may lag what `/v1/sync` already delivered.
    pub fn put_fetched(&mut self, key: UserKey, stored: Option<Stored>, now_ms: u64) {
        // KV holding what the entry already does (the usual read once the TTL ran out) or
        // older: only the time of the read changes, and the session records known to show
        // the entry still do (else every shopper's next request after a read would verify
        // and adopt their cookie again)
        if let Some(e) = self.lru.peek_mut(&key)
            && !e.changed_by_read(stored.as_ref())
        {
            e.fetched_at_ms = now_ms;
            return;
        }
        // not cached (any read is news), or changed by this one
        self.modify(key, now_ms, |e| e.set_base(stored.as_ref(), now_ms));
    }

    /// Applies a synced change to the cached entry, if any, under the version rules.
    pub fn apply(&mut self, key: &UserKey, change: &Change, now_ms: u64) -> CacheApply {
        let Some(entry) = self.lru.peek(key) else {
            return CacheApply::NotCached;
        };
        let mut held = entry.base();
        if entry.base.is_some() && held.is_none() {
            // Undecodable bytes cannot be patched; start over from KV.
            self.remove(key);
            return CacheApply::Dropped;
        }
        match delta::apply(&mut held, change) {
            Ok(Applied::Duplicate) => CacheApply::Applied(Applied::Duplicate),
            Ok(Applied::Updated) => {
                self.modify(*key, now_ms, |e| e.set_base(held.as_ref(), now_ms));
                CacheApply::Applied(Applied::Updated)
            }
            Err(_) => {
                self.drop_base(key);
                CacheApply::Dropped
            }
        }
    }

    /// What the shopper's session cookie says they were shown (`shared::session`): a base
    /// newer than the cached one replaces it — keeping when KV was last read, so a newer
    /// value there is still picked up when due — and their own events join the local ones
    /// (once each; those the base already holds retire as usual).
    pub fn adopt(&mut self, key: UserKey, base: Option<&Stored>, events: Vec<Event>, now_ms: u64) {
        let cached = self.lru.peek(&key);
        // a record holding nothing the entry does not (another device's record of the same
        // entry, say): the entry stays as it is, and so do the records known to show it
        if cached.is_some_and(|e| {
            !base.is_some_and(|b| e.takes_base(b)) && events.iter().all(|ev| e.holds_local(&ev.id))
        }) {
            return;
        }
        let cached = cached.is_some();
        self.modify(key, now_ms, |e| {
            if !cached {
                // never read here: leave it due for a KV read
                e.fetched_at_ms = 0;
            }
            if let Some(b) = base.filter(|b| e.takes_base(b)) {
                let fetched = e.fetched_at_ms;
                e.set_base(Some(b), fetched);
            }
            // the record's events were taken over its base: a newer cached base holds at most as
            // many of them as it advanced past that one
            let since = base.map_or(0, Stored::version);
            // a record from before an erasure this isolate knows of (an old cookie replayed, or
            // another device's): its events are what was erased
            if delta::erasure_epoch(e.version) > delta::erasure_epoch(since) {
                return;
            }
            let mut fresh: Vec<Event> = events
                .into_iter()
                .filter(|ev| !e.holds_local(&ev.id))
                .collect();
            if let Some(held) = e.base().filter(|_| e.version > since) {
                retire(&mut fresh, e.version - since, held.profile());
            }
            e.local.extend(fresh);
            shared::sort::sort_by_key_stable(&mut e.local, |l| l.ts_ms);
            if e.local.len() > MAX_LOCAL_EVENTS {
                let extra = e.local.len() - MAX_LOCAL_EVENTS;
                e.local.drain(..extra);
            }
        });
    }

    /// The base and the own events a shopper's session cookie should carry after this request.
    pub fn session_state(&self, key: &UserKey) -> Option<(Option<Stored>, Vec<Event>)> {
        self.lru.peek(key).map(|e| (e.base(), e.local.clone()))
    }

    /// Notes that the session record `tag`, issued at `issued_s`, shows `key`'s entry as it
    /// is now (not a change: the entry keeps its place and what it holds).
    pub fn mark_shown(&mut self, key: &UserKey, tag: [u8; session::TAG_LEN], issued_s: u64) {
        if let Some(e) = self.lru.peek_mut(key) {
            // latest first: this record's earlier place (if any) or the oldest makes room
            let at = e
                .shown
                .iter()
                .position(|s| s.is_some_and(|(mine, _)| same_tag(&mine, &tag)))
                .unwrap_or(SHOWN_RECORDS - 1);
            e.shown[..=at].rotate_right(1);
            e.shown[0] = Some((tag, issued_s));
        }
    }

    /// Whether `key` holds a not-yet-synced local event with this id.
    pub fn has_local(&self, key: &UserKey, id: &str) -> bool {
        self.lru.peek(key).is_some_and(|e| e.holds_local(id))
    }

    /// Adds the shopper's own event (read-your-writes), once per event id (a retried post or
    /// one the session cookie already brought is not counted twice). Creates an entry with an
    /// empty base when the shopper is not cached; callers load the base from KV first where
    /// they can.
    pub fn push_local(&mut self, key: UserKey, event: Event, now_ms: u64) {
        let unchecked = self.lru.peek(&key).is_none();
        self.modify(key, now_ms, |e| {
            if unchecked {
                // The base was never read (KV failed): leave it due for a read, or the
                // shopper's KV profile would be hidden behind these events for a whole TTL.
                e.fetched_at_ms = 0;
            }
            if e.local.iter().any(|l| l.id == event.id) {
                return;
            }
            if e.local.len() == MAX_LOCAL_EVENTS {
                e.local.remove(0);
            }
            e.local.push(event);
        });
    }

    /// Erases the shopper locally: the base becomes `tombstone`, local events are gone.
    /// Never lowers the held version: should a sync have moved the entry past the tombstone
    /// while the erasure was being stored, the tombstone takes that version (a tombstone wins
    /// a tie), and origin's own tombstone settles the rest.
    pub fn erase(&mut self, key: UserKey, tombstone: Stored, now_ms: u64) {
        self.modify(key, now_ms, |e| {
            let version = tombstone.version().max(e.version);
            e.local.clear();
            e.set_base(Some(&Stored::Tombstone { version }), now_ms);
        });
    }

    fn modify(&mut self, key: UserKey, now_ms: u64, f: impl FnOnce(&mut Entry)) {
        let entry = match self.lru.pop(&key) {
            Some(e) => {
                self.bytes -= e.bytes;
                e
            }
            None => Entry::new(None, now_ms),
        };
        let mut entry = entry;
        // whatever changes, no record is known to show the entry any more
        entry.shown = [None; SHOWN_RECORDS];
        f(&mut entry);
        entry.recount();
        self.bytes += entry.bytes;
        self.lru.push(key, entry);
        self.evict();
    }

    fn evict(&mut self) {
        while self.lru.len() > self.max_entries
            || (self.bytes > self.max_bytes && self.lru.len() > 1)
        {
            match self.lru.pop_lru() {
                Some((_, e)) => {
                    self.bytes -= e.bytes;
                    self.evictions += 1;
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::event::parse_event;

    fn key(n: u8) -> UserKey {
        UserKey([n; 12])
    }

    fn profile(version: u64) -> Stored {
        let mut p = Profile::new(7);
        p.version = version;
        p.views = version as u32;
        Stored::Profile(p)
    }

    fn add_camera(ts_ms: u64) -> Event {
        parse_event(
            format!(
                r#"{{"event_id":"e{ts_ms}","user_id":"u","ts":{ts_ms},"type":"add_to_cart","item":"cam-001","category":"cameras","price":499,"quantity":1}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    /// A KV read returning the entry's own base (its TTL ran out, nothing changed), or an
    /// older one (KV lagging a sync), keeps the session records known to show the entry and
    /// only moves the time of the read; a newer base forgets them.
    #[test]
    fn a_read_that_changes_nothing_keeps_the_records_known_to_show_the_entry() {
        let mut c = ProfileCache::new(10, usize::MAX);
        let shown = |c: &ProfileCache, tag| c.peek(&key(1)).unwrap().shows_record(tag, 100);
        let (phone, laptop) = ([1u8; session::TAG_LEN], [2u8; session::TAG_LEN]);
        c.put_fetched(key(1), Some(profile(3)), 0);
        c.mark_shown(&key(1), phone, 90);
        c.mark_shown(&key(1), laptop, 95);
        for (read, at) in [(profile(3), 30_000), (profile(2), 60_000)] {
            c.put_fetched(key(1), Some(read), at);
            assert!(shown(&c, &phone) && shown(&c, &laptop));
            let e = c.peek(&key(1)).unwrap();
            assert_eq!((e.version(), e.fetched_at_ms()), (3, at));
        }
        c.put_fetched(key(1), Some(profile(4)), 90_000);
        assert!(!shown(&c, &phone) && !shown(&c, &laptop));
        assert_eq!(c.peek(&key(1)).unwrap().version(), 4);
        // a third record displaces the oldest of two
        let tablet = [3u8; session::TAG_LEN];
        for tag in [phone, laptop, tablet] {
            c.mark_shown(&key(1), tag, 99);
        }
        assert!(!shown(&c, &phone) && shown(&c, &laptop) && shown(&c, &tablet));
    }

    /// A page view and an add to cart in the same second: origin's profile with the first only
    /// (its newest event is in that very second) must not retire the second, and the profile
    /// with both retires both — neither lost nor counted twice.
    #[test]
    fn events_of_one_second_retire_one_per_version_the_base_advanced() {
        let mut c = ProfileCache::new(10, usize::MAX);
        let ts = 1_800_000_000_200;
        let view = parse_event(
            format!(r#"{{"event_id":"v","user_id":"u","ts":{ts},"type":"page_view"}}"#).as_bytes(),
        )
        .unwrap();
        let add = add_camera(ts + 300);
        c.put_fetched(key(1), None, 0);
        c.push_local(key(1), view.clone(), 0);
        c.push_local(key(1), add.clone(), 0);
        let mut first = Profile::new(3);
        fold(&mut first, &view);
        c.put_fetched(key(1), Some(Stored::Profile(first.clone())), 1);
        let seen = c.peek(&key(1)).unwrap().profile(3).unwrap();
        assert_eq!(
            (seen.views, seen.cart.len()),
            (1, 1),
            "the add to cart is kept"
        );
        // the same base read again retires nothing more
        c.put_fetched(key(1), Some(Stored::Profile(first.clone())), 2);
        assert_eq!(c.peek(&key(1)).unwrap().local_events(), 1);
        let mut both = first;
        fold(&mut both, &add);
        c.put_fetched(key(1), Some(Stored::Profile(both)), 3);
        let e = c.peek(&key(1)).unwrap();
        assert_eq!(e.local_events(), 0);
        let seen = e.profile(3).unwrap();
        assert_eq!(
            (seen.views, seen.cart[0].quantity),
            (1, 1),
            "nothing counted twice"
        );
    }

    /// Another channel's purchase folded in the very second of the shopper's own page view:
    /// the version moved by one and the base's newest second is the view's, yet the base does
    /// not hold the view. Its event tags say so (by time alone the view was retired, and the
    /// shopper's next page missed it). A base without tags (format 1) still falls back to time.
    #[test]
    fn another_channels_event_in_the_same_second_does_not_retire_the_shoppers_own() {
        let ts: u64 = 1_800_000_000_200;
        let view = parse_event(
            format!(r#"{{"event_id":"v","user_id":"u","ts":{ts},"type":"page_view"}}"#).as_bytes(),
        )
        .unwrap();
        let purchase = parse_event(
            format!(
                r#"{{"event_id":"call-centre-1","user_id":"u","ts":{},"type":"purchase","item":"lens-001","category":"lenses","price":199}}"#,
                ts + 500
            )
            .as_bytes(),
        )
        .unwrap();
        let mut c = ProfileCache::new(10, usize::MAX);
        let base = Profile::new(3);
        c.put_fetched(key(1), None, 0);
        c.push_local(key(1), view.clone(), 0);
        let mut other = base.clone();
        fold(&mut other, &purchase);
        c.put_fetched(key(1), Some(Stored::Profile(other.clone())), 1);
        let e = c.peek(&key(1)).unwrap();
        assert_eq!(e.local_events(), 1, "the view is not in that base");
        let seen = e.profile(3).unwrap();
        assert_eq!((seen.views, seen.purchases.len()), (1, 1));
        // the next base holds both: nothing kept, nothing counted twice
        let mut both = other;
        fold(&mut both, &view);
        c.put_fetched(key(1), Some(Stored::Profile(both)), 2);
        let e = c.peek(&key(1)).unwrap();
        assert_eq!(e.local_events(), 0);
        assert_eq!(e.profile(3).unwrap().views, 1);

        // the same through the session cookie's record, adopted at another isolate
        let mut elsewhere = ProfileCache::new(10, usize::MAX);
        let mut other = base.clone();
        fold(&mut other, &purchase);
        elsewhere.put_fetched(key(1), Some(Stored::Profile(other.clone())), 1);
        elsewhere.adopt(key(1), None, vec![view.clone()], 1);
        assert_eq!(
            elsewhere.peek(&key(1)).unwrap().profile(3).unwrap().views,
            1
        );

        // a base of wire format 1 carries no tags: time decides, as before
        let mut old = ProfileCache::new(10, usize::MAX);
        old.put_fetched(key(1), None, 0);
        old.push_local(key(1), view, 0);
        other.folded.clear();
        old.put_fetched(key(1), Some(Stored::Profile(other)), 1);
        assert_eq!(old.peek(&key(1)).unwrap().local_events(), 0);
    }

    #[test]
    fn bounded_by_entries_and_bytes() {
        let mut c = ProfileCache::new(3, usize::MAX);
        for n in 0..5 {
            c.put_fetched(key(n), Some(profile(1)), 0);
        }
        assert_eq!(c.len(), 3);
        assert!(c.peek(&key(0)).is_none() && c.peek(&key(4)).is_some());
        assert_eq!(c.evictions(), 2);

        let one = {
            let mut c = ProfileCache::new(10, usize::MAX);
            c.put_fetched(key(0), Some(profile(1)), 0);
            c.bytes()
        };
        let mut c = ProfileCache::new(100, one * 2 + one / 2);
        for n in 0..5 {
            c.put_fetched(key(n), Some(profile(1)), 0);
        }
        assert_eq!(c.len(), 2);
        assert!(c.bytes() <= one * 2 + one / 2);
        // recently used survives
        c.get(&key(3));
        c.put_fetched(key(9), Some(profile(1)), 0);
        assert!(c.peek(&key(3)).is_some() && c.peek(&key(4)).is_none());
    }

    /// A shopper's own events count what they hold: a purchase of 40 lines is kilobytes, and
    /// counted as a few hundred bytes, a flood of such visitors filled the isolate's memory
    /// many times over while the cache read as within its bound.
    #[test]
    fn a_shoppers_own_events_count_what_they_hold() {
        let line = r#"{"item":"sku-0123456789-abcdefghij-0123456789-abcdefghij","category":"category-0123456789-abcdefghij-0123456789","price":1,"quantity":1}"#;
        let lines = vec![line; 40].join(",");
        let big = shared::event::parse_event(
            format!(
                r#"{{"event_id":"p-0","user_id":"u","ts":1800000000000,"type":"purchase","items":[{lines}]}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        let mut c = ProfileCache::new(100, usize::MAX);
        for n in 0..MAX_LOCAL_EVENTS {
            let mut e = big.clone();
            e.id = format!("p-{n}");
            c.push_local(key(1), e, 0);
        }
        // what the events hold on the heap: 40 lines of ~100 bytes of strings each, per event
        let held = MAX_LOCAL_EVENTS * 40 * 100;
        assert!(
            c.bytes() >= held,
            "{} bytes counted for at least {held} held",
            c.bytes()
        );
    }

    #[test]
    fn byte_count_stays_exact_through_updates_and_removals() {
        let mut c = ProfileCache::new(100, usize::MAX);
        c.put_fetched(key(1), Some(profile(1)), 0);
        c.push_local(key(1), add_camera(1_800_000_000_000), 0);
        c.put_fetched(key(2), None, 0);
        c.remove(&key(2));
        let sum: usize = [key(1)].iter().map(|k| c.peek(k).unwrap().bytes()).sum();
        assert_eq!(c.bytes(), sum);
    }

    #[test]
    fn versions_only_move_forward() {
        let mut c = ProfileCache::new(10, usize::MAX);
        c.put_fetched(key(1), Some(profile(5)), 0);
        c.put_fetched(key(1), Some(profile(3)), 10);
        let e = c.peek(&key(1)).unwrap();
        assert_eq!(e.version(), 5);
        assert_eq!(
            e.fetched_at_ms(),
            10,
            "a lagging read still counts as a check"
        );
    }

    #[test]
    fn patches_apply_on_their_version_and_gaps_drop_the_entry() {
        let mut c = ProfileCache::new(10, usize::MAX);
        let Stored::Profile(v5) = profile(5) else {
            unreachable!()
        };
        let mut v6 = v5.clone();
        v6.version = 6;
        v6.views = 99;
        let patch = delta::diff(&v5, &v6);
        assert_eq!(c.apply(&key(1), &patch, 0), CacheApply::NotCached);
        c.put_fetched(key(1), Some(Stored::Profile(v5)), 0);
        assert_eq!(
            c.apply(&key(1), &patch, 1),
            CacheApply::Applied(Applied::Updated)
        );
        assert_eq!(c.peek(&key(1)).unwrap().profile(0).unwrap().views, 99);
        assert_eq!(
            c.apply(&key(1), &patch, 2),
            CacheApply::Applied(Applied::Duplicate)
        );
        // a patch from a version we do not hold
        let mut v8 = v6.clone();
        v8.version = 8;
        let mut v9 = v8.clone();
        v9.version = 9;
        assert_eq!(
            c.apply(&key(1), &delta::diff(&v8, &v9), 3),
            CacheApply::Dropped
        );
        assert!(c.peek(&key(1)).is_none());
    }

    #[test]
    fn local_events_show_at_once_and_retire_when_origin_has_them() {
        let mut c = ProfileCache::new(10, usize::MAX);
        let ts = 1_800_000_000_000;
        c.push_local(key(1), add_camera(ts), 0);
        let seen = c.peek(&key(1)).unwrap().profile(3).unwrap();
        assert_eq!(seen.cart.len(), 1);
        assert_eq!(seen.bucket, 3);
        // origin's profile now includes the event
        let mut folded = Profile::new(3);
        fold(&mut folded, &add_camera(ts));
        c.put_fetched(key(1), Some(Stored::Profile(folded)), 1);
        let e = c.peek(&key(1)).unwrap();
        assert_eq!(e.local_events(), 0);
        assert_eq!(
            e.profile(3).unwrap().cart[0].quantity,
            1,
            "not counted twice"
        );
    }

    #[test]
    fn a_lagging_profile_of_the_tombstones_version_cannot_revive_it() {
        let mut c = ProfileCache::new(10, usize::MAX);
        c.put_fetched(key(1), Some(profile(4)), 0);
        c.erase(key(1), Stored::Tombstone { version: 5 }, 1);
        // KV (eventually consistent) still serves a profile of the same version
        c.put_fetched(key(1), Some(profile(5)), 2);
        assert!(
            c.peek(&key(1)).unwrap().profile(0).is_none(),
            "erasure wins the tie"
        );
    }

    #[test]
    fn a_tombstone_from_sync_or_kv_erases_local_events_too() {
        let ts = 1_800_000_000_000;
        let mut c = ProfileCache::new(10, usize::MAX);
        c.put_fetched(key(1), Some(profile(4)), 0);
        c.push_local(key(1), add_camera(ts), 0);
        // another isolate erased the shopper; KV now holds the tombstone
        c.put_fetched(key(1), Some(Stored::Tombstone { version: 5 }), 1);
        assert!(c.peek(&key(1)).unwrap().profile(0).is_none(), "from KV");

        let mut c = ProfileCache::new(10, usize::MAX);
        c.put_fetched(key(1), Some(profile(4)), 0);
        c.push_local(key(1), add_camera(ts), 0);
        let r = c.apply(&key(1), &Change::Tombstone { version: 5 }, 1);
        assert_eq!(r, CacheApply::Applied(Applied::Updated));
        assert!(c.peek(&key(1)).unwrap().profile(0).is_none(), "from sync");
        // acting again after the erasure shows, and survives a re-read of the same tombstone
        c.push_local(key(1), add_camera(ts + 5_000), 2);
        c.put_fetched(key(1), Some(Stored::Tombstone { version: 5 }), 3);
        assert_eq!(c.peek(&key(1)).unwrap().profile(0).unwrap().cart.len(), 1);
    }

    #[test]
    fn erasure_never_lowers_the_cached_version() {
        let mut c = ProfileCache::new(10, usize::MAX);
        c.put_fetched(key(1), Some(profile(7)), 0);
        c.erase(key(1), Stored::Tombstone { version: 5 }, 1);
        let e = c.peek(&key(1)).unwrap();
        assert_eq!(e.version(), 7);
        assert!(e.profile(0).is_none());
    }

    #[test]
    fn erased_shoppers_have_no_profile_until_they_act_again() {
        let mut c = ProfileCache::new(10, usize::MAX);
        c.put_fetched(key(1), Some(profile(4)), 0);
        c.erase(key(1), Stored::Tombstone { version: 5 }, 1);
        assert!(c.peek(&key(1)).unwrap().profile(0).is_none());
        assert_eq!(c.peek(&key(1)).unwrap().version(), 5);
        // an older profile from a lagging KV read cannot bring it back
        c.put_fetched(key(1), Some(profile(4)), 2);
        assert!(c.peek(&key(1)).unwrap().profile(0).is_none());
    }
}
