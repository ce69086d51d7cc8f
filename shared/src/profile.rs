//! The customer profile: what the edge knows about a shopper, kept small enough that ten
//! thousand of them fit in a few megabytes of an isolate's memory.
//!
//! Everything is bounded (interests, recent views, purchases) and keyed by compact ids
//! ([`ItemId`], [`CategoryId`]); names live in the catalog. Scores are fixed-point so that the
//! fold gives bit-identical results on native and wasm.

use crate::ids::{CategoryId, ItemId, Secs};
use serde::{Deserialize, Serialize};

/// How many category interests a profile keeps; the weakest is dropped past this.
pub const MAX_INTERESTS: usize = 16;
/// How many recently viewed items a profile keeps, newest first.
pub const MAX_RECENT: usize = 10;
/// How many purchases a profile keeps, newest first.
pub const MAX_PURCHASES: usize = 8;
/// How many distinct items a cart holds; adding more is ignored.
pub const MAX_CART_LINES: usize = 32;
/// Largest quantity of one cart line.
pub const MAX_QUANTITY: u16 = 999;
/// How many tags of the latest folded events a profile keeps, newest first.
pub const MAX_FOLDED: usize = 16;
/// Interest halves every week without new activity in the category.
pub const INTEREST_HALF_LIFE_SECS: u32 = 7 * 24 * 3600;

/// A non-negative interest score in fixed point, 1/64 of an event weight per unit.
///
/// Fixed point (not `f32`) so that stored values compare exactly and encode in 1–3 bytes.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
pub struct Score(pub u16);

impl Score {
    pub const SCALE: f32 = 64.0;

    pub fn from_f32(v: f32) -> Self {
        let q = (v * Self::SCALE).round();
        if q.is_nan() || q <= 0.0 {
            Score(0)
        } else if q >= f32::from(u16::MAX) {
            Score(u16::MAX)
        } else {
            Score(q as u16)
        }
    }

    pub fn to_f32(self) -> f32 {
        f32::from(self.0) / Self::SCALE
    }
}

/// Exponential decay factor for `elapsed` seconds: 2^(-elapsed / half-life).
pub fn decay_factor(elapsed_secs: u32) -> f32 {
    // libm, not `f32::exp2`: the platform's exp2 may round differently on native and wasm, and
    // the fold must give the same bits everywhere.
    libm::exp2f(-(elapsed_secs as f32) / INTEREST_HALF_LIFE_SECS as f32)
}

/// Interest in one category: `score` as of `at`; it decays from there.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Interest {
    pub category: CategoryId,
    pub score: Score,
    pub at: Secs,
}

impl Interest {
    /// The decayed score at `now` (no decay for `now` before `at`).
    pub fn score_at(&self, now: Secs) -> f32 {
        self.score.to_f32() * decay_factor(now.since(self.at))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct CartLine {
    pub item: ItemId,
    pub quantity: u16,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct PurchaseRecord {
    pub item: ItemId,
    pub at: Secs,
}

/// A short tag of an event id (FNV-1a 32 of the id): which events a profile has folded, so
/// the edge knows exactly which of a shopper's own events a newer base already holds. A tag
/// clash can only retire one of the shopper's own events early (they see it at the next base).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub struct EventTag(pub [u8; 4]);

impl EventTag {
    pub fn of(event_id: &str) -> EventTag {
        EventTag(crate::ids::fnv1a32(event_id.as_bytes()).to_le_bytes())
    }
}

/// Named segments as a bitset; recomputed by the fold after every event.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub struct Segments(pub u16);

impl Segments {
    /// Fewer than three page or product views so far.
    pub const NEW_VISITOR: Segments = Segments(1 << 0);
    /// Has bought at least once.
    pub const BUYER: Segments = Segments(1 << 1);
    /// Lifetime spend of at least 500.00.
    pub const HIGH_VALUE: Segments = Segments(1 << 2);
    /// Has something in the cart.
    pub const CART_ACTIVE: Segments = Segments(1 << 3);
    /// Browses a lot (five or more recent views) without having bought.
    pub const BROWSER: Segments = Segments(1 << 4);

    /// Segment names as rules spell them.
    pub const NAMED: [(&'static str, Segments); 5] = [
        ("new_visitor", Self::NEW_VISITOR),
        ("buyer", Self::BUYER),
        ("high_value", Self::HIGH_VALUE),
        ("cart_active", Self::CART_ACTIVE),
        ("browser", Self::BROWSER),
    ];

    pub fn by_name(name: &str) -> Option<Segments> {
        Self::NAMED
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
    }

    pub fn contains(self, other: Segments) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Self::NAMED
            .iter()
            .filter(move |(_, s)| self.contains(*s))
            .map(|(n, _)| *n)
    }
}

impl std::ops::BitOr for Segments {
    type Output = Segments;
    fn bitor(self, rhs: Segments) -> Segments {
        Segments(self.0 | rhs.0)
    }
}

/// Consent flags as a bitset. Personalization is on unless the shopper withdrew it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Consent(pub u8);

impl Consent {
    pub const PERSONALIZATION: u8 = 1 << 0;

    pub fn personalization(self) -> bool {
        self.0 & Self::PERSONALIZATION != 0
    }

    pub fn with_personalization(self, on: bool) -> Consent {
        if on {
            Consent(self.0 | Self::PERSONALIZATION)
        } else {
            Consent(self.0 & !Self::PERSONALIZATION)
        }
    }
}

impl Default for Consent {
    fn default() -> Self {
        Consent(Self::PERSONALIZATION)
    }
}

/// One shopper's profile. Field order is the wire order: changing it changes the format.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Profile {
    /// Bumped once per applied event (and by erasure); only ever moves forward.
    pub version: u64,
    /// Latest event time folded in.
    pub updated_at: Secs,
    /// Sorted by category, at most [`MAX_INTERESTS`].
    pub interests: Vec<Interest>,
    /// Most recent first, distinct, at most [`MAX_RECENT`].
    pub recent: Vec<ItemId>,
    /// Sorted by item, quantities ≥ 1.
    pub cart: Vec<CartLine>,
    /// Most recent first, at most [`MAX_PURCHASES`].
    pub purchases: Vec<PurchaseRecord>,
    /// Kept apart from `purchases`, which forgets old entries.
    pub last_purchase_at: Option<Secs>,
    /// Lifetime spend in cents.
    pub spend_cents: u64,
    /// Page and product views, saturating.
    pub views: u32,
    pub segments: Segments,
    /// Experiment bucket 0..100, from the keyed user hash: rules roll out by percentage.
    pub bucket: u8,
    pub consent: Consent,
    /// Tags of the events folded last, newest first, at most [`MAX_FOLDED`] (format 2 on).
    pub folded: Vec<EventTag>,
}

impl Profile {
    /// A fresh profile for the shopper whose keyed hash is `user_key`.
    pub fn new(bucket: u8) -> Self {
        Profile {
            bucket: bucket % 100,
            segments: Segments::NEW_VISITOR,
            ..Profile::default()
        }
    }

    pub fn interest(&self, category: CategoryId) -> Option<&Interest> {
        self.interests
            .binary_search_by_key(&category, |i| i.category)
            .ok()
            .map(|i| &self.interests[i])
    }

    pub fn cart_quantity(&self, item: ItemId) -> u16 {
        self.cart
            .binary_search_by_key(&item, |l| l.item)
            .map(|i| self.cart[i].quantity)
            .unwrap_or(0)
    }

    pub fn has_purchased(&self, item: ItemId) -> bool {
        self.purchases.iter().any(|p| p.item == item)
    }

    /// Interests ordered strongest first at `now` (ties by category id, for determinism).
    pub fn top_interests(&self, now: Secs) -> Vec<(CategoryId, f32)> {
        let mut v: Vec<(CategoryId, f32)> = self
            .interests
            .iter()
            .map(|i| (i.category, i.score_at(now)))
            .collect();
        // categories are distinct: a total order
        crate::sort::sort_unstable_by(&mut v, |a, b| {
            b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)).is_lt()
        });
        v
    }

    /// Checks the structural invariants a decoded profile must hold before it is trusted.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.interests.len() > MAX_INTERESTS {
            return Err("too many interests");
        }
        if !self
            .interests
            .windows(2)
            .all(|w| w[0].category < w[1].category)
        {
            return Err("interests not sorted and distinct");
        }
        if self.recent.len() > MAX_RECENT {
            return Err("too many recent items");
        }
        for (i, item) in self.recent.iter().enumerate() {
            if self.recent[..i].contains(item) {
                return Err("recent items not distinct");
            }
        }
        if self.cart.len() > MAX_CART_LINES {
            return Err("too many cart lines");
        }
        if !self.cart.windows(2).all(|w| w[0].item < w[1].item) {
            return Err("cart not sorted and distinct");
        }
        if self
            .cart
            .iter()
            .any(|l| l.quantity == 0 || l.quantity > MAX_QUANTITY)
        {
            return Err("cart quantity out of range");
        }
        if self.purchases.len() > MAX_PURCHASES {
            return Err("too many purchases");
        }
        if self.bucket >= 100 {
            return Err("bucket out of range");
        }
        if self.folded.len() > MAX_FOLDED {
            return Err("too many folded event tags");
        }
        Ok(())
    }
}

/// A sorted cart of one of each SKU: the cart tests across the crate start from.
#[cfg(test)]
pub(crate) fn cart_of(skus: &[&str]) -> Vec<CartLine> {
    let mut cart: Vec<CartLine> = skus
        .iter()
        .map(|s| CartLine {
            item: ItemId::of_sku(s),
            quantity: 1,
        })
        .collect();
    crate::sort::sort_by_key_stable(&mut cart, |l| l.item);
    cart
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_round_trips_and_saturates() {
        assert_eq!(Score::from_f32(1.0), Score(64));
        assert_eq!(Score::from_f32(-3.0), Score(0));
        assert_eq!(Score::from_f32(f32::NAN), Score(0));
        assert_eq!(Score::from_f32(1e9), Score(u16::MAX));
        assert_eq!(Score(96).to_f32(), 1.5);
    }

    #[test]
    fn interest_halves_each_half_life() {
        let i = Interest {
            category: CategoryId(1),
            score: Score::from_f32(8.0),
            at: Secs(100),
        };
        assert_eq!(i.score_at(Secs(100)), 8.0);
        assert!((i.score_at(Secs(100 + INTEREST_HALF_LIFE_SECS)) - 4.0).abs() < 1e-4);
        assert_eq!(i.score_at(Secs(0)), 8.0, "no growth before `at`");
    }

    #[test]
    fn segments_by_name() {
        assert_eq!(Segments::by_name("buyer"), Some(Segments::BUYER));
        assert_eq!(Segments::by_name("nope"), None);
        let s = Segments::BUYER | Segments::CART_ACTIVE;
        assert_eq!(s.names().collect::<Vec<_>>(), ["buyer", "cart_active"]);
    }

    #[test]
    fn consent_defaults_on() {
        let c = Consent::default();
        assert!(c.personalization());
        assert!(!c.with_personalization(false).personalization());
    }
}
