//! origin-sync as the edge sees it: events folded with `shared`'s fold (the code origin-sync
//! runs), erasures made into tombstones of the next epoch, and every `push_ms` the changed
//! shoppers' deltas (`shared::delta::diff` against what the edge acknowledged, as origin-sync
//! sends them) in signed sync frames to the entry isolate, and optionally to KV through the
//! bulk API. What the broker and the store add (durability, exactly-once across crashes) is
//! tested against the real service elsewhere; here only what reaches the edge, and when.

use shared::delta::{self, Change, Delta, Stored, tombstone_version};
use shared::event::{Event, EventKind};
use shared::fold::fold;
use shared::keys::UserKey;
use shared::profile::Profile;
use shared::protocol::SyncReply;
use shared::wire::{self, Codec, SyncBatch, SyncItem};
use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Default)]
struct UserRec {
    current: Option<Stored>,
    /// What the edge acknowledged (`None`: send a snapshot).
    acked: Option<Stored>,
    /// When the latest erasure was accepted: events the broker took at or before it are
    /// dropped (the arrival-time cutoff).
    erased_at_ms: Option<u64>,
}

#[derive(Debug, Default)]
pub struct Origin {
    users: HashMap<UserKey, UserRec>,
    touched: BTreeSet<UserKey>,
    /// origin-sync's coalescer: a key is pushed at most once per window (KV allows one write
    /// per second per key), so a change within the window waits for its end.
    last_pushed: HashMap<UserKey, u64>,
    pub coalesce_ms: u64,
    pub events_folded: u64,
    pub events_dropped_by_erasure: u64,
    pub frames_sent: u64,
    pub deltas_sent: u64,
    pub snapshots_resent: u64,
}

/// A frame ready to post to the entry isolate, with the keys it carries.
#[derive(Debug)]
pub struct Push {
    pub frame: Vec<u8>,
    pub keys: Vec<(UserKey, Stored)>,
}

impl Origin {
    /// An event the broker took at `arrived_ms`.
    pub fn take(&mut self, key: UserKey, event: &Event, arrived_ms: u64) {
        let rec = self.users.entry(key).or_default();
        if rec.erased_at_ms.is_some_and(|t| arrived_ms <= t) {
            self.events_dropped_by_erasure += 1;
            return;
        }
        let mut p = match rec.current.take() {
            Some(Stored::Profile(p)) => p,
            Some(Stored::Tombstone { version }) => {
                let mut p = Profile::new(key.bucket());
                p.version = version;
                p
            }
            None => Profile::new(key.bucket()),
        };
        fold(&mut p, event);
        rec.current = Some(Stored::Profile(p));
        self.events_folded += 1;
        self.touched.insert(key);
    }

    /// A sign-in (`identify`) taken at `arrived_ms`: as origin-sync does, the visitor's profile
    /// as it stands travels in the event and joins the signed-in one, and the visitor is
    /// retired with a tombstone of the next epoch.
    pub fn identify(&mut self, key: UserKey, visitor: UserKey, event: &Event, arrived_ms: u64) {
        let absorbed = match self.users.get(&visitor).and_then(|r| r.current.clone()) {
            Some(Stored::Profile(p)) if p.version > 0 && visitor != key => Some(p),
            _ => None,
        };
        let mut joined = event.clone();
        if let EventKind::Identify { anonymous, .. } = &event.kind {
            joined.kind = EventKind::Identify {
                anonymous: anonymous.clone(),
                absorbed: absorbed.clone().map(Box::new),
            };
        }
        self.take(key, &joined, arrived_ms);
        if let Some(p) = absorbed {
            let rec = self.users.entry(visitor).or_default();
            rec.current = Some(Stored::Tombstone {
                version: tombstone_version(p.version),
            });
            self.touched.insert(visitor);
        }
    }

    /// An erasure the edge accepted at `at_ms`. A repeat (no later) changes nothing.
    pub fn erase(&mut self, key: UserKey, at_ms: u64, at_least: Option<u64>) {
        let rec = self.users.entry(key).or_default();
        let held = rec.current.as_ref().map_or(0, Stored::version);
        let at_least = at_least.unwrap_or(0);
        // origin-sync's rule (`store::erase_in`): the same erasure again changes nothing,
        // unless the edge's tombstone for it is above what this holds
        if rec.erased_at_ms.is_some_and(|t| at_ms <= t) && at_least <= held {
            return;
        }
        rec.current = Some(Stored::Tombstone {
            version: tombstone_version(held).max(at_least),
        });
        rec.erased_at_ms = Some(rec.erased_at_ms.map_or(at_ms, |t| t.max(at_ms)));
        self.touched.insert(key);
    }

    /// The deltas of every shopper changed since the last push (and not pushed within the
    /// coalescing window), in frames of at most `max_items` deltas.
    pub fn push(&mut self, now: u64, max_items: usize) -> Vec<Push> {
        let touched = std::mem::take(&mut self.touched);
        let mut pushes = Vec::new();
        let mut items = Vec::new();
        let mut keys = Vec::new();
        for key in touched {
            if self
                .last_pushed
                .get(&key)
                .is_some_and(|t| now < t + self.coalesce_ms)
            {
                self.touched.insert(key);
                continue;
            }
            self.last_pushed.insert(key, now);
            let Some(rec) = self.users.get(&key) else {
                continue;
            };
            let Some(current) = rec.current.clone() else {
                continue;
            };
            let change = match (&rec.acked, &current) {
                (_, Stored::Tombstone { version }) => Change::Tombstone { version: *version },
                (Some(Stored::Profile(old)), Stored::Profile(new)) => delta::diff(old, new),
                (_, Stored::Profile(new)) => Change::Snapshot(new.clone()),
            };
            items.push(SyncItem::Delta(Delta { user: key, change }));
            keys.push((key, current));
            if items.len() == max_items {
                pushes.push(frame(std::mem::take(&mut items), std::mem::take(&mut keys)));
            }
        }
        if !items.is_empty() {
            pushes.push(frame(items, keys));
        }
        self.frames_sent += pushes.len() as u64;
        self.deltas_sent += pushes.iter().map(|p| p.keys.len() as u64).sum::<u64>();
        pushes
    }

    /// What the entry isolate answered: acknowledged keys move forward; gaps get snapshots
    /// at the next push; a failed request sends everything again.
    pub fn settle(&mut self, push: Push, reply: Option<SyncReply>) {
        let wanted: Vec<UserKey> = reply
            .as_ref()
            .map(SyncReply::snapshots_wanted)
            .unwrap_or_default();
        for (key, sent) in push.keys {
            let Some(rec) = self.users.get_mut(&key) else {
                continue;
            };
            if reply.is_none() || wanted.contains(&key) {
                if reply.is_some() {
                    rec.acked = None;
                    self.snapshots_resent += 1;
                }
                self.touched.insert(key);
            } else {
                rec.acked = Some(sent);
            }
        }
    }
}

fn frame(items: Vec<SyncItem>, keys: Vec<(UserKey, Stored)>) -> Push {
    Push {
        frame: wire::encode_batch(&SyncBatch { items }, Codec::None),
        keys,
    }
}
