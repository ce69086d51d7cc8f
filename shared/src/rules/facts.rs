//! Facts: what one request knows, computed once before any rule is looked at.
//!
//! Rule conditions read these, never the profile itself, so the cost of a request does not grow
//! with the number of rules times the size of the profile: the profile is scanned once, with
//! bounded reads (at most [`PROFILE_SCAN_LIMIT`] entries of each list, since profiles come from
//! the client and are untrusted), into flat per-category arrays and sorted lists.

use super::Device;
use crate::catalog::{Catalog, MAX_CATEGORIES};
use crate::ids::{ItemId, Secs};
use crate::profile::Profile;
use crate::recommend::RequestContext;

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
        self.cart_items.sort_unstable();
        self.cart_items.dedup();
        for id in &self.cart_items {
            if let Some(it) = catalog.item(*id)
                && !self.cart_categories.contains(it.category)
            {
                self.cart_categories.insert(it.category);
                self.cart_category_list.push(it.category);
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
                    .find(|(c, _)| *c == it.category)
                {
                    Some((_, at)) => *at = (*at).max(rec.at),
                    None => self.purchase_by_category.push((it.category, rec.at)),
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
    use crate::rules::Slot;
    use crate::rules::tests::catalog;

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
