//! A user's stored state: the folded `base`, the reorder window of recent events kept unfolded,
//! and what erasure and duplicate detection need. Pure: no redb here, so the fold-order rules
//! are tested on their own; `super` stores the encoded state under the user key.

use serde::{Deserialize, Serialize};
use shared::Profile;
use shared::delta::{Change, Stored, diff};
use shared::event::{Event, EventKind};
use shared::fold::fold;
use shared::keys::UserKey;
use shared::wire::v1;

use super::{StoreError, decode};

/// How many folded event ids a user remembers for duplicate detection of late events.
const SEEN_IDS: usize = 64;

/// The reorder window's parameters.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub reorder_ms: u64,
    pub max_events: usize,
}

/// An event of a user's reorder window, stored in a compact binary form: the window is most
/// of a user's stored state, and that state is rewritten on every change (as JSON the average
/// state was 381 bytes at the benchmark's traffic, 60% of it window).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct WindowEvent {
    ts_ms: u64,
    id: String,
    kind: EventKind,
    /// When it reached origin's side (`UserState::insert`), if known: what an erasure applied
    /// late compares with its cutoff. Not in the serde form: the state's arrivals trail it
    /// ([`UserState::encode`]), so builds from before them read the state (postcard leaves
    /// trailing bytes alone) and theirs read as unknown.
    #[serde(skip)]
    arrived_ms: Option<u64>,
}

impl WindowEvent {
    fn new(ev: &Event, arrived_ms: Option<u64>) -> Self {
        WindowEvent {
            ts_ms: ev.ts_ms,
            id: ev.id.clone(),
            kind: ev.kind.clone(),
            arrived_ms,
        }
    }

    /// The event again, for folding; the fold never reads the user id, which the store keys by.
    fn event(&self) -> Event {
        Event {
            id: self.id.clone(),
            user: String::new(),
            ts_ms: self.ts_ms,
            kind: self.kind.clone(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct UserState {
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

/// [`UserState`] as layout-1 stores hold it: the same fields, the profile in wire format 1
/// (before `Profile::folded`). Read by the layout upgrade, never written.
#[derive(Deserialize)]
struct UserStateV1 {
    base: v1::Profile,
    window: Vec<WindowEvent>,
    frozen: Option<(u64, String)>,
    seen: Vec<u64>,
    erased: Option<(u64, u64)>,
}

/// [`UserState`] as stores written before the compact window form hold it (window events as
/// JSON, the folded profile stored too; layout 1). Read, never written.
#[derive(Deserialize)]
struct LegacyUserState {
    base: v1::Profile,
    window: Vec<LegacyWindowEvent>,
    frozen: Option<(u64, String)>,
    seen: Vec<u64>,
    erased: Option<(u64, u64)>,
    #[allow(dead_code)]
    current: v1::Profile,
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
            base: self.base.into(),
            // these were validated when first stored
            window: self
                .window
                .iter()
                .filter_map(|w| shared::event::parse_event(&w.json).ok())
                .map(|e| WindowEvent::new(&e, None))
                .collect(),
            frozen: self.frozen,
            seen: self.seen,
            erased: self.erased,
            current: Profile::default(),
        }
    }
}

pub(super) enum Insert {
    Windowed,
    Late,
    Duplicate,
    Erased,
}

fn id_hash(ts_ms: u64, id: &str) -> u64 {
    let mut h = shared::ids::Fnv1a64::seeded(ts_ms);
    h.write(id.as_bytes());
    h.finish()
}

impl UserState {
    pub(super) fn fresh(key: &UserKey) -> Self {
        UserState {
            base: Profile::new(key.bucket()),
            current: Profile::new(key.bucket()),
            ..UserState::default()
        }
    }

    /// Folds the window on top of the base again (after an out-of-order arrival).
    /// The state of a user erased at `version`, at Unix ms `at`: events at or before `at` are
    /// dropped from now on; newer ones start a fresh profile above `version`.
    pub(super) fn tombstone(key: &UserKey, version: u64, at: u64) -> Self {
        let mut base = Profile::new(key.bucket());
        base.version = version;
        UserState {
            current: base.clone(),
            base,
            window: Vec::new(),
            frozen: None,
            seen: Vec::new(),
            erased: Some((version, at)),
        }
    }

    /// Erased at (version, Unix ms), if ever.
    pub(super) fn erased(&self) -> Option<(u64, u64)> {
        self.erased
    }

    pub(super) fn refold(&mut self) {
        let mut p = self.base.clone();
        for w in &self.window {
            fold(&mut p, &w.event());
        }
        self.current = p;
    }

    /// Folds `ev` in, which reached origin's side (the broker's message timestamp, or origin's
    /// ingest time) at `arrived_ms`. An erasure's cutoff compares with that, never with the
    /// event's own `ts_ms`, which the browser chose: an event taken before the erasure is
    /// dropped however far ahead its browser clock ran, and one taken after it is kept however
    /// far behind. Without an arrival time (a test, an old record) the event time stands in.
    pub(super) fn insert(&mut self, ev: &Event, arrived_ms: Option<u64>, window: Window) -> Insert {
        if let Some((_, at)) = self.erased
            && arrived_ms.unwrap_or(ev.ts_ms) <= at
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
                self.window.insert(at, WindowEvent::new(ev, arrived_ms));
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

    /// The stored form: the state in postcard, then, when any window event's arrival is known,
    /// the window's arrivals in window order (a trailing field; see `WindowEvent::arrived_ms`),
    /// each as its distance from the event's own time (varints: a few bytes an event where
    /// the whole time would take seven).
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = super::encode(self);
        if self.window.iter().any(|w| w.arrived_ms.is_some()) {
            let arrivals: Vec<Option<i64>> = self
                .window
                .iter()
                .map(|w| w.arrived_ms.map(|a| a as i64 - w.ts_ms as i64))
                .collect();
            out.extend_from_slice(&super::encode(&arrivals));
        }
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<UserState, StoreError> {
        let mut state = UserState::decode_unfolded(bytes)?;
        state.refold();
        Ok(state)
    }

    /// The stored record as it is, its profile not computed (`current` is empty): for what
    /// needs only the record's own fields, such as its erasure.
    pub(super) fn decode_unfolded(bytes: &[u8]) -> Result<UserState, StoreError> {
        let (mut state, rest) = postcard::take_from_bytes::<UserState>(bytes)
            .map_err(|e| StoreError::Corrupt(format!("user: {e}")))?;
        if !rest.is_empty() {
            let arrivals: Vec<Option<i64>> = decode(rest, "user's window arrivals")?;
            // written with this window, or not at all (a build that dropped them re-encoded
            // the state, and a later one appended none)
            if arrivals.len() == state.window.len() {
                for (w, a) in state.window.iter_mut().zip(arrivals) {
                    w.arrived_ms = a.map(|d| (w.ts_ms as i64).saturating_add(d) as u64);
                }
            }
        }
        Ok(state)
    }

    /// This state erased at Unix ms `at`, at `version`: a tombstone, with the window's events
    /// that arrived after `at` folded on it again. Applied late (the erasure log's follower
    /// lagging, an edge's erasure delivered after an outage), the erasure would otherwise
    /// drop with the rest what the shopper did after it that was folded before it got here.
    /// Only the window's events can be put back (what left it is in the base, folded with
    /// everything before it), and only those whose arrival is known: in doubt (a state an
    /// older build wrote) the erasure takes the event, never the browser's clock.
    pub(super) fn erased_at(&self, key: &UserKey, version: u64, at: u64, window: Window) -> Self {
        let mut state = UserState::tombstone(key, version, at);
        for w in &self.window {
            if let Some(arrived) = w.arrived_ms.filter(|a| *a > at) {
                state.insert(&w.event(), Some(arrived), window);
            }
        }
        state
    }

    /// A record of a layout-1 store (`super::layout`), in either of its two forms.
    pub(super) fn decode_layout1(bytes: &[u8]) -> Result<UserState, StoreError> {
        let state = match decode::<UserStateV1>(bytes, "user") {
            Ok(s) => UserState {
                base: s.base.into(),
                window: s.window,
                frozen: s.frozen,
                seen: s.seen,
                erased: s.erased,
                current: Profile::default(),
            },
            // written before window events had their binary form: convert on read
            Err(e) => match postcard::from_bytes::<LegacyUserState>(bytes) {
                Ok(old) => old.upgrade(),
                Err(_) => return Err(e),
            },
        };
        let mut state = state;
        state.refold();
        Ok(state)
    }

    /// The record as a layout-1 store held it: for tests of the upgrade.
    #[cfg(test)]
    pub(super) fn encode_layout1(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Layout1<'a> {
            base: v1::Profile,
            window: &'a [WindowEvent],
            frozen: &'a Option<(u64, String)>,
            seen: &'a [u64],
            erased: Option<(u64, u64)>,
        }
        super::encode(&Layout1 {
            base: (&self.base).into(),
            window: &self.window,
            frozen: &self.frozen,
            seen: &self.seen,
            erased: self.erased,
        })
    }

    pub(super) fn remember(&mut self, h: u64) {
        self.seen.push(h);
        if self.seen.len() > SEEN_IDS {
            self.seen.remove(0);
        }
    }

    pub(super) fn current(&self) -> Stored {
        if let Some((v, _)) = self.erased
            && self.current.version == v
        {
            return Stored::Tombstone { version: v };
        }
        Stored::Profile(self.current.clone())
    }

    pub(super) fn current_version(&self) -> u64 {
        self.current.version
    }
}

/// Change a delta from the acknowledged value to the current one.
pub(super) fn change_for(acked: Option<&Stored>, current: &Stored) -> Option<Change> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use shared::catalog::Catalog;
    use shared::event::Line;
    use shared::fold::fold_all;
    use shared::traffic::Traffic;

    fn encode<T: Serialize>(v: &T) -> Vec<u8> {
        super::super::encode(v)
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
            let stored = encode(&WindowEvent::new(&ev, None));
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
            base: v1::Profile,
            window: Vec<OldWindowEvent>,
            frozen: Option<(u64, String)>,
            seen: Vec<u64>,
            erased: Option<(u64, u64)>,
            current: v1::Profile,
        }
        let catalog = Catalog::demo().expect("demo catalog");
        let events: Vec<Event> = Traffic::new(&catalog, 1, "old", 1_764_000_000_000, 1, 5)
            .take(3)
            .collect();
        let key = UserKey::derive(b"k", "old-u0");
        let mut current = Profile::new(key.bucket());
        fold_all(&mut current, &events);
        let old = OldState {
            base: (&Profile::new(key.bucket())).into(),
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
            current: (&current).into(),
        };
        let state = UserState::decode_layout1(&encode(&old)).expect("reads the old form");
        assert_eq!(state.window.len(), 3);
        assert_eq!(state.current, current);
    }

    /// An erasure applied late keeps what arrived after its cutoff and is still in the window,
    /// whatever the browser's clock said: the same profile as if the erasure had come on time
    /// and those events after it. Arrivals survive the stored form; a state without them (an
    /// older build's) loses its window to the erasure; an older build reads the new form.
    #[test]
    fn an_erasure_applied_late_keeps_the_windows_events_that_arrived_after_it() {
        let window = Window {
            reorder_ms: 60_000,
            max_events: 64,
        };
        let key = UserKey::derive(b"k", "late-erasure");
        let ev = |id: &str, ts_ms: u64, item: &str| Event {
            id: id.into(),
            user: String::new(),
            ts_ms,
            kind: EventKind::AddToCart(Line {
                item: item.into(),
                category: "c".into(),
                price_cents: 100,
                quantity: 1,
            }),
        };
        let cutoff = 1_000_000;
        // (event, arrival): two before the cutoff, one after whose browser clock is behind,
        // two after
        let events = [
            (ev("b1", cutoff - 50, "old-1"), cutoff - 40),
            (ev("b2", cutoff - 20, "old-2"), cutoff - 10),
            (ev("a0", cutoff - 30, "new-0"), cutoff + 5),
            (ev("a1", cutoff + 10, "new-1"), cutoff + 20),
            (ev("a2", cutoff + 30, "new-2"), cutoff + 40),
        ];
        let mut state = UserState::fresh(&key);
        for (e, arrived) in &events {
            state.insert(e, Some(*arrived), window);
        }
        let version = shared::delta::tombstone_version(state.current_version());
        let mut on_time = UserState::tombstone(&key, version, cutoff);
        for (e, arrived) in &events[2..] {
            on_time.insert(e, Some(*arrived), window);
        }
        let late = state.erased_at(&key, version, cutoff, window);
        assert_eq!(late.current(), on_time.current());
        assert!(late.current_version() > version);
        assert_eq!(late.erased(), Some((version, cutoff)));

        let stored = UserState::decode(&state.encode()).expect("reads");
        assert_eq!(
            stored.erased_at(&key, version, cutoff, window).current(),
            on_time.current()
        );
        // no arrivals stored: the erasure takes the whole window
        let older: UserState = UserState::decode(&encode(&state)).expect("reads");
        assert_eq!(
            older.erased_at(&key, version, cutoff, window).current(),
            Stored::Tombstone { version }
        );
        // what an older build's decode does with the new form
        let read_by_older: UserState = postcard::from_bytes(&state.encode()).expect("reads");
        assert_eq!(read_by_older.window.len(), events.len());
    }

    /// The stored forms are pinned: the window's events (postcard of `shared`'s `EventKind`,
    /// which replaced a mirror type with the same layout) and the hash of seen ids, both in
    /// stores already written.
    #[test]
    fn stored_window_event_and_id_hash_are_pinned() {
        let ev = Event {
            id: "e1".into(),
            user: String::new(),
            ts_ms: 1,
            kind: EventKind::AddToCart(shared::event::Line {
                item: "a".into(),
                category: "c".into(),
                price_cents: 300,
                quantity: 2,
            }),
        };
        assert_eq!(
            encode(&WindowEvent::new(&ev, None)),
            [1, 2, b'e', b'1', 2, 1, b'a', 1, b'c', 0xac, 0x02, 2]
        );
        // FNV-1a 64 from the offset basis XOR the timestamp, as written before
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ 1_764_000_000_000;
        for b in b"evt-7" {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        assert_eq!(id_hash(1_764_000_000_000, "evt-7"), h);
    }
}
