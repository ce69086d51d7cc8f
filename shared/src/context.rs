//! The request vocabulary that both the rules and the recommender read: what a request says
//! ([`RequestContext`], [`Slot`], [`Device`]) and what it knows once the profile has been
//! looked at (`Facts`).
//!
//! Why it is its own module: rules are written in terms of slots and devices and evaluated over
//! a request's facts, while the recommender builds those facts and applies the rules. Kept in
//! either of the two, this vocabulary made each import from the other. Here it sits below both:
//! `rules` and `recommend` import from `context`, `recommend` imports from `rules`, and nothing
//! imports the other way. The old paths (`crate::rules::Slot`, `crate::recommend::MAX_K`,
//! `crate::recommend::RequestContext`, …) are re-exports of these.
//!
//! Facts are computed once per request, before any rule is looked at. Rule conditions read
//! them, never the profile itself: the profile (untrusted, from the client) is scanned once, with
//! bounded reads (at most [`PROFILE_SCAN_LIMIT`] entries of each list), into flat per-category
//! arrays and sorted lists.

use crate::catalog::{Catalog, MAX_CATEGORIES};
use crate::ids::{ItemId, Secs};
use crate::profile::Profile;
use serde::{Deserialize, Serialize};

/// Largest number of items one request may ask for.
pub const MAX_K: usize = 50;
/// Items returned when the caller has no preference.
pub const DEFAULT_K: usize = 10;

// ---------------------------------------------------------------------------------------------
// What the request says: slot, device, the rest of the request
// ---------------------------------------------------------------------------------------------

/// Where on the site recommendations are shown.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Slot {
    Home,
    Product,
    Category,
    Cart,
    Checkout,
}

impl Slot {
    pub const ALL: [Slot; 5] = [
        Slot::Home,
        Slot::Product,
        Slot::Category,
        Slot::Cart,
        Slot::Checkout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Slot::Home => "home",
            Slot::Product => "product",
            Slot::Category => "category",
            Slot::Cart => "cart",
            Slot::Checkout => "checkout",
        }
    }

    /// The slot with this name (as rules and the API spell it).
    pub fn parse(name: &str) -> Option<Slot> {
        Slot::ALL.into_iter().find(|s| s.as_str() == name)
    }

    pub(crate) fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// The shopper's device class, from the request.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// Not known; `device` conditions never match it.
    #[default]
    Unknown,
    Desktop,
    Mobile,
    Tablet,
}

impl Device {
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Unknown => "unknown",
            Device::Desktop => "desktop",
            Device::Mobile => "mobile",
            Device::Tablet => "tablet",
        }
    }

    /// `"mobile"`, `"desktop"` or `"tablet"`; anything else is not a device class.
    pub fn parse(name: &str) -> Option<Device> {
        [Device::Desktop, Device::Mobile, Device::Tablet]
            .into_iter()
            .find(|d| d.as_str() == name)
    }

    pub(crate) fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// What the request says, besides the profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestContext {
    pub slot: Slot,
    /// How many items to return; clamped to `1..=MAX_K`.
    pub k: usize,
    pub now: Secs,
    /// ISO 3166 alpha-2 (case-insensitive), if known.
    pub country: Option<[u8; 2]>,
    pub device: Device,
    /// Breaks ties between equal scores; e.g. a hash of the visitor and the day.
    pub seed: u64,
    /// The product being viewed (product pages): never recommended, its accessories are.
    pub current_item: Option<ItemId>,
}

impl RequestContext {
    /// A request for `slot` at `now` with [`DEFAULT_K`] items and nothing else known.
    pub fn new(slot: Slot, now: Secs) -> Self {
        RequestContext {
            slot,
            k: DEFAULT_K,
            now,
            country: None,
            device: Device::Unknown,
            seed: 0,
            current_item: None,
        }
    }
}

/// A two-letter ISO 3166 alpha-2 code as [`RequestContext::country`] holds it (uppercase), from
/// text in either case (a `cf-ipcountry` header, an API parameter). Anything else (`"USA"`,
/// `"T1"`, `""`) is not a country code. The one parser of request countries, so the edge's
/// header and its query parameter cannot disagree on what a country is.
pub fn parse_country(code: &str) -> Option<[u8; 2]> {
    match code.as_bytes() {
        [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
            Some([a.to_ascii_uppercase(), b.to_ascii_uppercase()])
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Facts: what one request knows, computed once
// ---------------------------------------------------------------------------------------------

/// A set of dense category indexes (< [`MAX_CATEGORIES`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CatSet([u64; MAX_CATEGORIES / 64]);

impl CatSet {
    pub(crate) const fn new() -> Self {
        CatSet([0; MAX_CATEGORIES / 64])
    }
    pub(crate) fn insert(&mut self, c: u16) {
        if let Some(w) = self.0.get_mut(usize::from(c >> 6)) {
            *w |= 1 << (c & 63);
        }
    }
    pub(crate) fn contains(&self, c: u16) -> bool {
        self.0
            .get(usize::from(c >> 6))
            .is_some_and(|w| w & (1 << (c & 63)) != 0)
    }
}

/// Bounds on how much of an (untrusted) profile one request looks at.
pub(crate) const PROFILE_SCAN_LIMIT: usize = 64;

/// Per-request facts the rule checks read. Built once per request.
#[derive(Clone, Debug, Default)]
pub(crate) struct Facts {
    pub(crate) slot: u8,
    pub(crate) now: Secs,
    pub(crate) has_profile: bool,
    pub(crate) cart_categories: CatSet,
    /// The same categories as a list, in cart order.
    pub(crate) cart_category_list: Vec<u16>,
    /// Sorted, distinct.
    pub(crate) cart_items: Vec<ItemId>,
    /// Decayed interest per dense category index (empty without a profile).
    pub(crate) interest: Vec<f32>,
    pub(crate) last_purchase_any: Option<Secs>,
    /// Latest purchase per dense category, one entry per category.
    pub(crate) purchase_by_category: Vec<(u16, Secs)>,
    pub(crate) segments: u16,
    pub(crate) bucket: u8,
    pub(crate) country: Option<[u8; 2]>,
    pub(crate) device: Device,
}

impl Facts {
    /// Facts for a request. A profile without personalization consent counts as no profile.
    #[cfg(test)]
    pub(crate) fn build(
        catalog: &Catalog,
        profile: Option<&Profile>,
        ctx: &RequestContext,
    ) -> Facts {
        let mut facts = Facts::default();
        facts.rebuild(catalog, profile, ctx);
        facts
    }

    /// Like [`Facts::build`], reusing this value's buffers.
    pub(crate) fn rebuild(
        &mut self,
        catalog: &Catalog,
        profile: Option<&Profile>,
        ctx: &RequestContext,
    ) {
        self.slot = ctx.slot.bit();
        self.now = ctx.now;
        self.has_profile = false;
        self.cart_categories = CatSet::new();
        self.cart_category_list.clear();
        self.cart_items.clear();
        self.interest.clear();
        self.last_purchase_any = None;
        self.purchase_by_category.clear();
        self.segments = 0;
        self.bucket = 0;
        self.country = ctx.country.and_then(|c| {
            let c = [c[0].to_ascii_uppercase(), c[1].to_ascii_uppercase()];
            c.iter().all(u8::is_ascii_uppercase).then_some(c)
        });
        self.device = ctx.device;
        let Some(p) = profile.filter(|p| p.consent.personalization()) else {
            return;
        };
        self.has_profile = true;
        self.segments = p.segments.0;
        self.bucket = p.bucket;
        self.cart_items
            .extend(p.cart.iter().take(PROFILE_SCAN_LIMIT).map(|l| l.item));
        crate::sort::sort_unstable(&mut self.cart_items);
        self.cart_items.dedup();
        for id in &self.cart_items {
            if let Some(it) = catalog.item(*id)
                && !self.cart_categories.contains(it.rec.category)
            {
                self.cart_categories.insert(it.rec.category);
                self.cart_category_list.push(it.rec.category);
            }
        }
        self.interest.resize(catalog.categories.len(), 0.0);
        for i in p.interests.iter().take(PROFILE_SCAN_LIMIT) {
            // A well-formed profile has one entry per category; keep the strongest.
            if let Some(c) = catalog.category_dense(i.category)
                && let Some(v) = self.interest.get_mut(usize::from(c))
            {
                *v = v.max(i.score_at(ctx.now));
            }
        }
        let mut latest = p.last_purchase_at;
        for rec in p.purchases.iter().take(PROFILE_SCAN_LIMIT) {
            latest = Some(latest.map_or(rec.at, |l| l.max(rec.at)));
            if let Some(it) = catalog.item(rec.item) {
                match self
                    .purchase_by_category
                    .iter_mut()
                    .find(|(c, _)| *c == it.rec.category)
                {
                    Some((_, at)) => *at = (*at).max(rec.at),
                    None => self.purchase_by_category.push((it.rec.category, rec.at)),
                }
            }
        }
        self.last_purchase_any = latest;
    }

    pub(crate) fn last_purchase(&self, category: Option<u16>) -> Option<Secs> {
        match category {
            None => self.last_purchase_any,
            Some(c) => self
                .purchase_by_category
                .iter()
                .find(|(pc, _)| *pc == c)
                .map(|(_, at)| *at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::CategoryId;
    use crate::profile::{CartLine, Interest, PurchaseRecord, Score};
    use crate::rules::tests::catalog;

    /// Downstream crates name these types by the paths they had before this module existed.
    #[test]
    fn old_paths_name_the_same_types() {
        let slot: crate::rules::Slot = Slot::Cart;
        let device: crate::rules::Device = Device::Tablet;
        let ctx: crate::recommend::RequestContext = RequestContext::new(slot, Secs(7));
        assert_eq!(ctx.k, crate::recommend::DEFAULT_K);
        assert_eq!(crate::recommend::MAX_K, MAX_K);
        assert_eq!((ctx.slot, device), (Slot::Cart, Device::Tablet));
    }

    #[test]
    fn countries_are_two_ascii_letters_in_either_case() {
        assert_eq!(parse_country("US"), Some(*b"US"));
        assert_eq!(parse_country("de"), Some(*b"DE"));
        assert_eq!(parse_country("fR"), Some(*b"FR"));
        for bad in ["", "U", "USA", "T1", "1U", "é", "éé", "U ", " U"] {
            assert_eq!(parse_country(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn vocabulary_parses() {
        for s in Slot::ALL {
            assert_eq!(Slot::parse(s.as_str()), Some(s));
        }
        assert_eq!(Slot::parse("Home"), None);
        assert_eq!(Device::parse("mobile"), Some(Device::Mobile));
        assert_eq!(Device::parse("unknown"), None);
        assert_eq!(Device::default(), Device::Unknown);
    }

    fn cam() -> ItemId {
        ItemId::of_sku("cam-001")
    }

    #[test]
    fn facts_are_bounded_and_robust() {
        let cat = catalog();
        // A malformed profile (unsorted, duplicates, unknown ids, huge lists) must not panic.
        let mut p = Profile::new(42);
        for i in 0..500u32 {
            p.cart.push(CartLine {
                item: ItemId(i.wrapping_mul(7919)),
                quantity: 0,
            });
            p.interests.push(Interest {
                category: CategoryId(i),
                score: Score(u16::MAX),
                at: Secs(u32::MAX),
            });
            p.purchases.push(PurchaseRecord {
                item: cam(),
                at: Secs(u32::MAX - i),
            });
        }
        p.bucket = 255;
        let facts = Facts::build(&cat, Some(&p), &RequestContext::new(Slot::Home, Secs(0)));
        assert!(facts.cart_items.len() <= PROFILE_SCAN_LIMIT);
        assert_eq!(facts.interest.len(), cat.categories().len());
        assert_eq!(facts.purchase_by_category.len(), 1);
    }

    #[test]
    fn catset() {
        let mut s = CatSet::new();
        for c in [0u16, 63, 64, 1023] {
            assert!(!s.contains(c));
            s.insert(c);
            assert!(s.contains(c));
        }
        s.insert(5000); // out of range: ignored, no panic
        assert!(!s.contains(5000));
        assert!(!s.contains(1));
    }
}
