//! Step 3 of a request: one additive, explainable score per candidate.
//!
//! `popularity + affinity + cart/viewed accessory signal + rule boosts`, each term weighted by
//! a public `W_*` constant; the largest personal term becomes the item's [`Reason`] (a cart
//! accessory always says so). Each candidate also gets a tie hash, seeded per request, so equal
//! scores are ordered by the seed and then by item index, never by iteration order.

use super::{
    CART_ACCESSORY, ITEM_BOOSTED, Reason, Request, Scored, VIEWED_ACCESSORY, W_AFFINITY,
    W_CART_ACCESSORY_CATEGORY, W_CART_ACCESSORY_ITEM, W_POPULARITY, W_VIEWED_ACCESSORY_CATEGORY,
    W_VIEWED_ACCESSORY_ITEM,
};
use crate::ids::ItemId;

impl<'a, 'p, 's> Request<'a, 'p, 's> {
    pub(super) fn compute_affinity(&mut self) {
        let s = &mut *self.s;
        let max = s.facts.interest.iter().copied().fold(0.0f32, f32::max);
        if max > 0.0 && max.is_finite() {
            s.affinity.extend(s.facts.interest.iter().map(|v| v / max));
        }
    }

    /// Score and reason of one item.
    pub(super) fn score(&self, index: u32) -> Option<(f32, Reason, u16)> {
        let s = &*self.s;
        let it = self.catalog.hot.get(index as usize)?;
        let c = it.category;
        let flags = self.flag(index as usize);
        let popularity = W_POPULARITY * it.popularity;
        let affinity = W_AFFINITY * s.affinity.get(usize::from(c)).copied().unwrap_or(0.0);
        let cart = if flags & CART_ACCESSORY != 0 {
            W_CART_ACCESSORY_ITEM
        } else if self.cart_accessory_categories.contains(c) {
            W_CART_ACCESSORY_CATEGORY
        } else {
            0.0
        };
        let viewed = if flags & VIEWED_ACCESSORY != 0 {
            W_VIEWED_ACCESSORY_ITEM
        } else if self.viewed_accessory_categories.contains(c) {
            W_VIEWED_ACCESSORY_CATEGORY
        } else {
            0.0
        };
        let mut rule = s.category_boost.get(usize::from(c)).copied().unwrap_or(0.0);
        if !s.tag_boost_dense.is_empty() {
            for t in self.catalog.hot_tags(it) {
                rule += s.tag_boost_dense.get(*t as usize).copied().unwrap_or(0.0);
            }
        } else if !s.tag_boosts.is_empty() {
            for t in self.catalog.hot_tags(it) {
                if let Ok(p) = s.tag_boosts.binary_search_by_key(t, |(k, _)| *k) {
                    rule += s.tag_boosts.get(p).map_or(0.0, |(_, b)| *b);
                }
            }
        }
        if flags & ITEM_BOOSTED != 0
            && let Ok(p) = s.item_boosts.binary_search_by_key(&index, |(k, _)| *k)
        {
            rule += s.item_boosts.get(p).map_or(0.0, |(_, b)| *b);
        }
        let total = popularity + affinity + cart + viewed + rule;
        let reason = if cart > 0.0 {
            Reason::CartAccessory
        } else {
            let mut best = (0.0f32, Reason::Popular);
            for (v, r) in [
                (rule, Reason::Rule),
                (viewed, Reason::RecentlyViewedAccessory),
                (affinity, Reason::Interest),
            ] {
                if v > best.0 {
                    best = (v, r);
                }
            }
            best.1
        };
        Some((total, reason, c))
    }

    pub(super) fn id_of(&self, index: u32) -> ItemId {
        self.catalog
            .hot
            .get(index as usize)
            .map_or(ItemId(0), |h| h.id)
    }

    fn tie(&self, index: u32) -> u64 {
        mix64(self.ctx.seed ^ mix64(u64::from(self.id_of(index).0))) & TIE_MASK
    }

    pub(super) fn score_candidates(&mut self) {
        let mut scored = std::mem::take(&mut self.s.scored);
        scored.clear();
        for &index in &self.s.candidates {
            if let Some((score, reason, category)) = self.score(index) {
                scored.push(Scored {
                    index,
                    category,
                    score,
                    tie: self.tie(index),
                    reason,
                });
            }
        }
        self.s.scored = scored;
    }
}

/// SplitMix64's finalizer: a fast, well-mixed, stable hash for tie-breaking.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
/// Tie hashes keep 48 bits so they fit the selection sort key.
pub(super) const TIE_MASK: u64 = (1 << 48) - 1;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::Slot;
    use crate::ids::CategoryId;
    use crate::profile::{Consent, Interest, Profile, Score, Segments};
    use crate::recommend::tests::{NOW, cart_profile, category_slug, ctx, demo, flat_catalog, run};
    use crate::rules::CompiledRules;
    use std::collections::BTreeSet;

    #[test]
    fn seeds_only_reorder_ties() {
        let catalog = flat_catalog(30, 1);
        let rules = CompiledRules::none(&catalog);
        let mut orders = BTreeSet::new();
        let mut c = ctx(Slot::Home);
        c.k = 10;
        let reference = run(&catalog, &rules, None, &c);
        for seed in 0..16 {
            c.seed = seed;
            let rec = run(&catalog, &rules, None, &c);
            let scores: Vec<f32> = rec.items.iter().map(|r| r.score).collect();
            let ref_scores: Vec<f32> = reference.items.iter().map(|r| r.score).collect();
            assert_eq!(scores, ref_scores, "seed {seed} changed scores");
            orders.insert(rec.skus(&catalog).join(","));
        }
        assert!(
            orders.len() > 8,
            "seeds should reorder ties, got {} orders",
            orders.len()
        );

        // With distinct scores, the seed changes nothing.
        let (catalog, rules) = demo();
        let p = cart_profile(&["cam-001"]);
        let mut c = ctx(Slot::Cart);
        let a = run(&catalog, &rules, Some(&p), &c);
        c.seed = 99;
        let b = run(&catalog, &rules, Some(&p), &c);
        let sa: Vec<f32> = a.items.iter().map(|r| r.score).collect();
        let sb: Vec<f32> = b.items.iter().map(|r| r.score).collect();
        assert_eq!(sa, sb);
    }
    #[test]
    fn interest_drives_personal_results() {
        let (catalog, rules) = demo();
        let mut p = Profile::new(99);
        p.segments = Segments(0);
        p.interests = vec![Interest {
            category: CategoryId::of_name("monitors"),
            score: Score::from_f32(10.0),
            at: NOW,
        }];
        let rec = run(&catalog, &rules, Some(&p), &ctx(Slot::Home));
        assert_eq!(category_slug(&catalog, &rec.items[0]), "monitors");
        assert_eq!(rec.items[0].reason, Reason::Interest);
        let monitors = rec
            .items
            .iter()
            .filter(|r| category_slug(&catalog, r) == "monitors")
            .count();
        assert!(
            (2..=6).contains(&monitors),
            "diversity keeps some variety: {monitors}"
        );

        // Without consent the profile is ignored entirely.
        p.consent = Consent::default().with_personalization(false);
        let off = run(&catalog, &rules, Some(&p), &ctx(Slot::Home));
        let anon = run(&catalog, &rules, None, &ctx(Slot::Home));
        assert!(!off.personalized);
        assert_eq!(off, anon);
        assert!(
            anon.items
                .iter()
                .all(|r| matches!(r.reason, Reason::Popular | Reason::Rule))
        );
    }
}
