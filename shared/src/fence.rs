//! The erasure fence: the recent erasures every edge reader checks what it reads against.
//!
//! Workers KV has no compare-and-swap, so a write that carries a shopper's data from before an
//! erasure (origin's KV bulk sink, or another isolate applying a push origin sent before it
//! heard of the erasure) can land *after* the tombstone and overwrite it. Writers cannot prevent
//! that; readers can: each recent erasure is listed here with its tombstone version, and a value
//! below that version is read as the tombstone, whatever KV or a cache holds. Values above it
//! are what the shopper did after the erasure, and pass.
//!
//! origin-sync publishes the fence as a document (`ConfigKind::Erasures`) built from every
//! erasure it stored, through the same signed path and KV key layout as the catalog and rules;
//! an isolate also fences its own erasures at once. Entries are kept for [`FENCE_WINDOW_MS`]
//! after the erasure, far longer than any write already in flight can take to land (a sync or
//! bulk request's timeout); after that, the tombstones origin delivered are the record.

use crate::delta::Stored;
use crate::keys::UserKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How long an erasure stays in the fence after it was accepted.
pub const FENCE_WINDOW_MS: u64 = 60 * 60 * 1000;

/// At most this many erasures are fenced (the newest): about 60 bytes each in the document.
pub const MAX_FENCE_ENTRIES: usize = 10_000;

/// One fenced erasure: the tombstone's version and when the erasure was accepted.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Floor {
    pub version: u64,
    pub at_ms: u64,
}

/// Recent erasures by user key.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct ErasureFence {
    floors: BTreeMap<UserKey, Floor>,
}

#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum FenceError {
    #[error("the erasure fence is not the expected JSON: {0}")]
    Json(String),
    #[error("the erasure fence lists {0} erasures; at most {MAX_FENCE_ENTRIES}")]
    TooMany(usize),
    #[error("the erasure fence names {0:?}, which is not a user key (24 hex digits)")]
    BadKey(String),
}

/// The document's JSON form: `{"erased": [["<user key hex>", tombstone version, at ms], ...]}`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    erased: Vec<(String, u64, u64)>,
}

impl ErasureFence {
    /// The tombstone version below which nothing read for `key` is believed.
    pub fn floor(&self, key: &UserKey) -> Option<u64> {
        self.floors.get(key).map(|f| f.version)
    }

    pub fn len(&self) -> usize {
        self.floors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.floors.is_empty()
    }

    /// Fences an erasure (the higher tombstone wins; a repeat changes nothing).
    pub fn raise(&mut self, key: UserKey, version: u64, at_ms: u64) {
        let floor = self.floors.entry(key).or_insert(Floor { version, at_ms });
        if version > floor.version {
            *floor = Floor { version, at_ms };
        }
    }

    /// Takes in every erasure `other` fences.
    pub fn merge(&mut self, other: &ErasureFence) {
        for (key, f) in &other.floors {
            self.raise(*key, f.version, f.at_ms);
        }
    }

    /// Forgets erasures accepted more than [`FENCE_WINDOW_MS`] before `now_ms`, then the oldest
    /// beyond [`MAX_FENCE_ENTRIES`].
    pub fn trim(&mut self, now_ms: u64) {
        let horizon = now_ms.saturating_sub(FENCE_WINDOW_MS);
        self.floors.retain(|_, f| f.at_ms >= horizon);
        if self.floors.len() > MAX_FENCE_ENTRIES {
            let mut times: Vec<u64> = self.floors.values().map(|f| f.at_ms).collect();
            crate::sort::sort_unstable(&mut times);
            let cut = times[self.floors.len() - MAX_FENCE_ENTRIES];
            self.floors.retain(|_, f| f.at_ms >= cut);
            // equal times at the cut: drop by key order until within bounds
            while self.floors.len() > MAX_FENCE_ENTRIES {
                let oldest = self
                    .floors
                    .iter()
                    .min_by_key(|(_, f)| f.at_ms)
                    .map(|(k, _)| *k);
                match oldest {
                    Some(k) => self.floors.remove(&k),
                    None => break,
                };
            }
        }
    }

    /// The newest erasure's time (0 when empty): origin trims relative to it, so the document
    /// depends only on the erasures, not on when it was built.
    pub fn newest_ms(&self) -> u64 {
        self.floors.values().map(|f| f.at_ms).max().unwrap_or(0)
    }

    /// What a reader may believe for `key`, given what it read: a value below the fence's
    /// tombstone (or none at all) is that tombstone.
    pub fn check(&self, key: &UserKey, stored: Option<Stored>) -> Option<Stored> {
        match self.floor(key) {
            Some(version) if stored.as_ref().is_none_or(|s| s.version() < version) => {
                Some(Stored::Tombstone { version })
            }
            _ => stored,
        }
    }

    pub fn to_json(&self) -> String {
        let doc = Document {
            erased: self
                .floors
                .iter()
                .map(|(k, f)| (k.to_hex(), f.version, f.at_ms))
                .collect(),
        };
        serde_json::to_string(&doc).unwrap_or_else(|_| r#"{"erased":[]}"#.to_owned())
    }

    pub fn from_json(source: &str) -> Result<ErasureFence, FenceError> {
        let doc: Document =
            serde_json::from_str(source).map_err(|e| FenceError::Json(e.to_string()))?;
        if doc.erased.len() > MAX_FENCE_ENTRIES {
            return Err(FenceError::TooMany(doc.erased.len()));
        }
        let mut fence = ErasureFence::default();
        for (hex, version, at_ms) in doc.erased {
            let key = UserKey::from_hex(&hex).ok_or(FenceError::BadKey(hex))?;
            fence.raise(key, version, at_ms);
        }
        Ok(fence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Profile;
    use crate::delta::tombstone_version;

    fn profile(version: u64) -> Stored {
        Stored::Profile(Profile {
            version,
            ..Profile::default()
        })
    }

    #[test]
    fn a_value_from_before_the_erasure_reads_as_the_tombstone() {
        let key = UserKey([1; 12]);
        let t = tombstone_version(41);
        let mut fence = ErasureFence::default();
        fence.raise(key, t, 1_000);
        // the late bulk write of version 41 (or an undelivered 45) and nothing at all
        for read in [Some(profile(41)), Some(profile(45)), None] {
            assert_eq!(
                fence.check(&key, read),
                Some(Stored::Tombstone { version: t })
            );
        }
        // what the shopper did after the erasure passes, and so do other shoppers
        assert_eq!(
            fence.check(&key, Some(profile(t + 2))),
            Some(profile(t + 2))
        );
        let other = UserKey([2; 12]);
        assert_eq!(fence.check(&other, Some(profile(41))), Some(profile(41)));
    }

    #[test]
    fn the_document_round_trips_and_bad_ones_are_refused() {
        let mut fence = ErasureFence::default();
        fence.raise(UserKey([1; 12]), 1 << 40, 5);
        fence.raise(UserKey([2; 12]), 2 << 40, 7);
        fence.raise(UserKey([2; 12]), 1 << 40, 9); // lower: ignored
        let back = ErasureFence::from_json(&fence.to_json()).expect("parses");
        assert_eq!(back, fence);
        assert_eq!(back.floor(&UserKey([2; 12])), Some(2 << 40));
        assert!(matches!(
            ErasureFence::from_json(r#"{"erased":[["zz",1,1]]}"#),
            Err(FenceError::BadKey(_))
        ));
        assert!(matches!(
            ErasureFence::from_json(r#"{"erased":[], "more": 1}"#),
            Err(FenceError::Json(_))
        ));
        let many: Vec<String> = (0..=MAX_FENCE_ENTRIES as u32)
            .map(|i| {
                let mut k = [0u8; 12];
                k[..4].copy_from_slice(&i.to_be_bytes());
                format!("[\"{}\",1,1]", UserKey(k).to_hex())
            })
            .collect();
        let src = format!("{{\"erased\":[{}]}}", many.join(","));
        assert_eq!(
            ErasureFence::from_json(&src),
            Err(FenceError::TooMany(MAX_FENCE_ENTRIES + 1))
        );
    }

    #[test]
    fn old_erasures_leave_the_fence_and_it_stays_bounded() {
        let mut fence = ErasureFence::default();
        fence.raise(UserKey([1; 12]), 1 << 40, 1_000);
        fence.raise(UserKey([2; 12]), 1 << 40, 1_000 + FENCE_WINDOW_MS);
        fence.trim(2_000 + FENCE_WINDOW_MS);
        assert_eq!(fence.len(), 1);
        assert_eq!(fence.floor(&UserKey([1; 12])), None);
        let key_of = |i: u32| {
            let mut k = [9u8; 12];
            k[..4].copy_from_slice(&i.to_be_bytes());
            UserKey(k)
        };
        for i in 0..(MAX_FENCE_ENTRIES as u32 + 10) {
            fence.raise(key_of(i), 1 << 40, 2_000_000 + u64::from(i));
        }
        fence.trim(fence.newest_ms());
        // the oldest go first: the ten earliest of the burst and nothing newer
        assert_eq!(fence.len(), MAX_FENCE_ENTRIES);
        assert_eq!(fence.floor(&key_of(10)), None);
        assert_eq!(fence.floor(&key_of(11)), Some(1 << 40));
        assert_eq!(fence.floor(&UserKey([2; 12])), Some(1 << 40));
    }
}
