//! Step 2 of a request: the bounded set of items worth scoring.
//!
//! A request never looks at the whole catalog. Candidates come from a fixed list of sources,
//! in order, each read only as deep as `k` needs (with the diversity penalty a small `k` never
//! reaches far into one category): accessories of the cart, of the page's item and of recently
//! viewed items, the top items of the strongest interest categories, what fired rules boost,
//! then best sellers, until at most [`MAX_CANDIDATES`] are in. Deduplication and filtering are
//! lookups in the per-item flags, not hashing.

use super::{
    BOOSTED_SOURCES, CART_ACCESSORY, EXCLUDED, MAX_CANDIDATES, MIN_POPULAR_CANDIDATES,
    PER_BOOSTED_SOURCE, PER_CART_ACCESSORY_CATEGORY, PER_INTEREST_CATEGORY,
    PER_VIEWED_ACCESSORY_CATEGORY, RECENT_ACCESSORIES, Request, SEEN, TOP_INTERESTS,
    VIEWED_ACCESSORY,
};
use crate::context::PROFILE_SCAN_LIMIT;
use crate::profile::MAX_RECENT;

impl<'a, 'p, 's> Request<'a, 'p, 's> {
    /// Whether an item may be shown at all.
    pub(super) fn allowed(&self, index: u32) -> bool {
        self.flag(index as usize) & EXCLUDED == 0
            && self
                .catalog
                .hot
                .get(index as usize)
                .is_some_and(|h| h.in_stock && !self.excluded_categories.contains(h.category))
    }

    /// How deep to read one popularity-ordered source: with the diversity penalty, a small k
    /// never reaches far into one category, so small requests read shallower lists.
    fn depth(&self, base: usize) -> usize {
        base.min(self.k / 2 + 3)
    }

    fn full(&self) -> bool {
        self.s.candidates.len() >= MAX_CANDIDATES
    }

    /// Adds a candidate; returns whether it was new and allowed.
    fn add(&mut self, index: u32) -> bool {
        if self.full() || self.flag(index as usize) & (SEEN | EXCLUDED) != 0 {
            return false;
        }
        if !self.allowed(index) {
            self.mark(index as usize, EXCLUDED);
            return false;
        }
        self.mark(index as usize, SEEN);
        self.s.candidates.push(index);
        true
    }

    /// Adds up to `n` allowed items from a popularity-ordered list.
    fn add_top(&mut self, list: &[u32], n: usize) {
        let mut added = 0;
        for &i in list {
            if added >= n || self.full() {
                break;
            }
            if self.add(i) {
                added += 1;
            }
        }
    }

    fn add_category_top(&mut self, category: u16, n: usize) {
        let catalog = self.catalog;
        if let Some(c) = catalog.categories.get(usize::from(category)) {
            self.add_top(&c.items, n);
        }
    }

    /// Accessories of `item` (flagged with `bit`), and returns its accessory categories.
    fn add_accessories(&mut self, item: usize, bit: u8, limit: usize) -> &'a [u16] {
        let catalog = self.catalog;
        let Some(it) = catalog.items.get(item) else {
            return &[];
        };
        for &a in it.accessory_indexes().iter().take(limit) {
            self.mark(a as usize, bit);
            self.add(a);
        }
        catalog
            .categories
            .get(usize::from(it.rec.category))
            .map_or(&[], |c| &c.accessory_categories)
    }

    /// The keys of the (up to) `N` largest positive values, largest first; ties go to the
    /// smaller `rank` key. A bounded insertion instead of a sort: sources have a few dozen
    /// entries and only the first handful are read. Repeated keys are taken once.
    fn top<const N: usize>(
        values: impl Iterator<Item = (u32, f32)>,
        rank: impl Fn(u32) -> u64,
    ) -> ([u32; N], usize) {
        let mut top = [(0u32, 0.0f32, 0u64); N];
        let mut len = 0;
        for (k, v) in values {
            if v.is_nan() || v <= 0.0 || top.iter().take(len).any(|(tk, _, _)| *tk == k) {
                continue;
            }
            let r = rank(k);
            let beats = |(_, tv, tr): &(u32, f32, u64)| v > *tv || (v == *tv && r < *tr);
            let pos = top.iter().take(len).position(beats).unwrap_or(len);
            if pos >= N {
                continue;
            }
            // Shift the tail down one slot (dropping the last if full), then insert.
            let mut i = len.min(N - 1);
            while i > pos {
                if let Some(prev) = top.get(i - 1).copied()
                    && let Some(slot) = top.get_mut(i)
                {
                    *slot = prev;
                }
                i -= 1;
            }
            if let Some(slot) = top.get_mut(pos) {
                *slot = (k, v, r);
            }
            len = (len + 1).min(N);
        }
        let mut keys = [0u32; N];
        for (out, (k, _, _)) in keys.iter_mut().zip(top) {
            *out = k;
        }
        (keys, len)
    }

    pub(super) fn generate_candidates(&mut self) {
        let catalog = self.catalog;

        // 1. What goes with the cart: listed accessories, then accessory categories.
        if let Some(p) = self.profile {
            let mut acc_categories = std::mem::take(&mut self.s.categories);
            for line in p.cart.iter().take(PROFILE_SCAN_LIMIT) {
                if let Some(i) = catalog.index_of(line.item) {
                    for &c in self.add_accessories(i, CART_ACCESSORY, usize::MAX) {
                        if !self.cart_accessory_categories.contains(c) {
                            self.cart_accessory_categories.insert(c);
                            acc_categories.push(c);
                        }
                    }
                }
            }
            for &c in &acc_categories {
                self.add_category_top(c, self.depth(PER_CART_ACCESSORY_CATEGORY));
            }
            self.s.categories = acc_categories;
        }

        // 2. What goes with the page's item.
        if let Some(cur) = self.ctx.current_item.and_then(|id| catalog.index_of(id)) {
            let acc_categories = self.add_accessories(cur, VIEWED_ACCESSORY, usize::MAX);
            for &c in acc_categories {
                self.viewed_accessory_categories.insert(c);
            }
            for &c in acc_categories {
                self.add_category_top(c, self.depth(PER_VIEWED_ACCESSORY_CATEGORY));
            }
        }

        if let Some(p) = self.profile {
            // 3. What goes with recently viewed items.
            for id in p.recent.iter().take(MAX_RECENT) {
                if let Some(i) = catalog.index_of(*id) {
                    self.add_accessories(i, VIEWED_ACCESSORY, RECENT_ACCESSORIES);
                }
            }

            // 4. The strongest interest categories (ties by category id, as profiles rank).
            let (top, n) = Self::top::<TOP_INTERESTS>(dense_values(&self.s.facts.interest), |c| {
                catalog
                    .categories
                    .get(c as usize)
                    .map_or(u64::MAX, |c| u64::from(c.id.0))
            });
            for &c in top.iter().take(n) {
                let c = u16::try_from(c).unwrap_or(u16::MAX);
                self.add_category_top(c, self.depth(PER_INTEREST_CATEGORY));
            }
        }

        // 5. What fired rules promote.
        let (top, n) =
            Self::top::<BOOSTED_SOURCES>(dense_values(&self.s.category_boost), u64::from);
        for &c in top.iter().take(n) {
            let c = u16::try_from(c).unwrap_or(u16::MAX);
            self.add_category_top(c, self.depth(PER_BOOSTED_SOURCE));
        }
        let (top, n) = Self::top::<BOOSTED_SOURCES>(self.s.tag_boosts.iter().copied(), u64::from);
        for &t in top.iter().take(n) {
            if let Some(list) = catalog.items_by_tag.get(t as usize) {
                self.add_top(list, self.depth(PER_BOOSTED_SOURCE));
            }
        }
        for j in 0..self.s.item_boosts.len() {
            if let Some(&(i, b)) = self.s.item_boosts.get(j)
                && b > 0.0
            {
                self.add(i);
            }
        }

        // 6. Best sellers, so there is always something to show.
        let target = (self.k * 4).clamp(MIN_POPULAR_CANDIDATES, MAX_CANDIDATES);
        for &i in &catalog.popular {
            if self.s.candidates.len() >= target {
                break;
            }
            self.add(i);
        }
    }
}

/// `(index, value)` pairs of a dense array.
fn dense_values(v: &[f32]) -> impl Iterator<Item = (u32, f32)> + '_ {
    v.iter()
        .enumerate()
        .map(|(i, x)| (u32::try_from(i).unwrap_or(u32::MAX), *x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_keeps_the_largest_positive_values() {
        let (top, n) = Request::top::<3>(
            [
                (4, 1.0),
                (1, 5.0),
                (7, 1.0),
                (2, -3.0),
                (1, 5.0),
                (9, f32::NAN),
                (3, 2.0),
                (8, 1.0),
            ]
            .into_iter(),
            |k| u64::from(10 - k),
        );
        assert_eq!(n, 3);
        // 1 (5.0), 3 (2.0), then among the 1.0s the smallest rank: 8 (rank 2).
        assert_eq!(top, [1, 3, 8]);
        let (_, n) = Request::top::<4>([(1, 0.0), (2, -1.0)].into_iter(), u64::from);
        assert_eq!(n, 0);
    }
}
