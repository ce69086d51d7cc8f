//! Step 1 of a request: the rules that fire, and what they ask for.
//!
//! The index (`crate::rules`) says which rules fire; this walks them once, highest priority
//! first, and collects everything the later steps read: per-category, per-tag and per-item
//! boosts (summed, in a deterministic order so float sums are bit-identical), pins, the first
//! offer, and the hard exclusions, which it marks on the per-item flags right away: purchased
//! and in-cart items unless a fired rule lifts that, excluded categories and items, and the
//! page's own item.

use super::{DENSE_TAG_LIMIT, EXCLUDED, ITEM_BOOSTED, Request};
use crate::context::PROFILE_SCAN_LIMIT;
use crate::rules::Target;

impl<'a, 'p, 's> Request<'a, 'p, 's> {
    /// Finds the rules that fire; collects their boosts, pins, exclusions and the offer;
    /// marks hard exclusions. Returns the fired rules' names.
    pub(super) fn apply_rules(&mut self) -> Vec<&'a str> {
        let (mut purchased_on, mut purchased_off) = (false, false);
        let (mut in_cart_on, mut in_cart_off) = (false, false);
        let n_categories = self.catalog.categories.len();
        let n_tags = self.catalog.tags.len();
        let dense_tags = n_tags <= DENSE_TAG_LIMIT;
        let rules = self.rules;
        let mut fired = std::mem::take(&mut self.s.fired);
        rules.fired(&self.s.facts, &mut fired, &mut self.s.rules);
        let mut names = Vec::with_capacity(fired.len());
        for &i in &fired {
            let i = i as usize;
            let Some(head) = rules.heads.get(i) else {
                continue;
            };
            if let Some(name) = rules.names.get(i) {
                names.push(&**name);
            }
            if head.has_offer && self.offer.is_none() {
                self.offer = rules.rules.get(i).and_then(|r| r.offer.as_ref());
            }
            for &(target, by) in rules.head_boosts(head) {
                match target {
                    Target::Category(c) => {
                        if self.s.category_boost.is_empty() {
                            self.s.category_boost.resize(n_categories, 0.0);
                        }
                        if let Some(b) = self.s.category_boost.get_mut(usize::from(c)) {
                            *b += by;
                        }
                    }
                    Target::Tag(t) if dense_tags => {
                        if self.s.tag_boost_dense.is_empty() {
                            self.s.tag_boost_dense.resize(n_tags, 0.0);
                        }
                        if let Some(b) = self.s.tag_boost_dense.get_mut(t as usize) {
                            if *b == 0.0 {
                                // First boost of this tag (or its sum came back to zero:
                                // listed twice then, which `top_ranked` tolerates).
                                self.s.tag_boosts.push((t, 0.0));
                            }
                            *b += by;
                        }
                    }
                    Target::Tag(t) => self.s.tag_boosts.push((t, by)),
                    Target::Item(i) => {
                        self.mark(i as usize, ITEM_BOOSTED);
                        self.s.item_boosts.push((i, by));
                    }
                }
            }
            if !head.has_extras {
                continue;
            }
            let Some(rule) = rules.rules.get(i) else {
                continue;
            };
            for (item, position) in rule.pins.iter() {
                self.s.pins.push((*position, *item));
            }
            match rule.exclude_purchased {
                Some(true) => purchased_on = true,
                Some(false) => purchased_off = true,
                None => {}
            }
            match rule.exclude_in_cart {
                Some(true) => in_cart_on = true,
                Some(false) => in_cart_off = true,
                None => {}
            }
            for c in rule.exclude_categories.iter() {
                self.excluded_categories.insert(*c);
            }
            self.s.exclude_items.extend_from_slice(&rule.exclude_items);
        }
        self.s.fired = fired;
        merge_sorted(&mut self.s.item_boosts);
        if dense_tags {
            // Sums are in the dense array; `tag_boosts` lists the boosted tags, unsorted.
            let s = &mut *self.s;
            for (t, b) in &mut s.tag_boosts {
                *b = s.tag_boost_dense.get(*t as usize).copied().unwrap_or(0.0);
            }
        } else {
            merge_sorted(&mut self.s.tag_boosts);
        }

        // Hard filters. Purchased and in-cart items are excluded by default; a fired rule may
        // lift that (`purchased = false`) unless another fired rule insists (`true` wins).
        for j in 0..self.s.exclude_items.len() {
            if let Some(&i) = self.s.exclude_items.get(j) {
                self.mark(i as usize, EXCLUDED);
            }
        }
        if let Some(cur) = self
            .ctx
            .current_item
            .and_then(|id| self.catalog.index_of(id))
        {
            self.mark(cur, EXCLUDED);
        }
        if let Some(p) = self.profile {
            if purchased_on || !purchased_off {
                for rec in p.purchases.iter().take(PROFILE_SCAN_LIMIT) {
                    if let Some(i) = self.catalog.index_of(rec.item) {
                        self.mark(i, EXCLUDED);
                    }
                }
            }
            if in_cart_on || !in_cart_off {
                for line in p.cart.iter().take(PROFILE_SCAN_LIMIT) {
                    if let Some(i) = self.catalog.index_of(line.item) {
                        self.mark(i, EXCLUDED);
                    }
                }
            }
        }
        names
    }
}

/// Sorts `(key, value)` pairs by key and sums values of equal keys, in place. Values are
/// part of the sort order so the float sums are bit-identical whatever the input order.
fn merge_sorted(v: &mut Vec<(u32, f32)>) {
    v.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    v.dedup_by(|cur, kept| {
        if cur.0 == kept.0 {
            kept.1 += cur.1;
            true
        } else {
            false
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::context::{Device, RequestContext, Slot};
    use crate::ids::{ItemId, Secs};
    use crate::profile::{Profile, PurchaseRecord, Segments};
    use crate::recommend::tests::{FILTER_CATALOG, NOW, ctx, demo, filter_profile, run};
    use crate::recommend::{DIVERSITY_PENALTY, Reason};
    use crate::rules::CompiledRules;

    #[test]
    fn demo_rules_fire_as_described() {
        let (catalog, rules) = demo();
        // Returning buyer: bought 45 days ago.
        let mut buyer = Profile::new(90);
        let bought = Secs(NOW.0 - 45 * 86_400);
        buyer.purchases = vec![PurchaseRecord {
            item: ItemId::of_sku("hp-001"),
            at: bought,
        }];
        buyer.last_purchase_at = Some(bought);
        buyer.segments = Segments::BUYER;
        let rec = run(&catalog, &rules, Some(&buyer), &ctx(Slot::Home));
        assert_eq!(rec.offer.map(|o| o.id.as_str()), Some("welcome-back-5"));
        assert!(
            rec.skus(&catalog).iter().all(|s| *s != "hp-001"),
            "purchased item shown"
        );

        // Mobile in the US, anonymous: the mobile rule fires with its offer.
        let mut c = ctx(Slot::Home);
        c.device = Device::Mobile;
        c.country = Some(*b"US");
        let rec = run(&catalog, &rules, None, &c);
        assert_eq!(rec.offer.map(|o| o.id.as_str()), Some("free-2day-mobile"));
        c.country = Some(*b"FR");
        let rec = run(&catalog, &rules, None, &c);
        assert_eq!(rec.offer, None);

        // Percentage rollout: bucket 5 is in, bucket 50 is out.
        for (bucket, fires) in [(5u8, true), (50, false)] {
            let mut p = Profile::new(bucket);
            p.segments = Segments(0);
            let rec = run(&catalog, &rules, Some(&p), &ctx(Slot::Home));
            assert_eq!(
                rec.fired_rules.contains(&"new-arrivals-rollout"),
                fires,
                "bucket {bucket}"
            );
        }
    }
    #[test]
    fn filters_are_always_applied() {
        let catalog = Catalog::from_toml(FILTER_CATALOG).expect("catalog");
        let rules = CompiledRules::none(&catalog);
        let p = filter_profile();
        let mut c = ctx(Slot::Product);
        c.current_item = Some(ItemId::of_sku("viewing"));
        c.k = 50;
        let rec = run(&catalog, &rules, Some(&p), &c);
        let skus = rec.skus(&catalog);
        for banned in ["bought", "carted", "gone", "viewing"] {
            assert!(!skus.contains(&banned), "{banned} recommended: {skus:?}");
        }
        assert_eq!(skus.len(), 4, "{skus:?}");
        // The page item's accessory outranks more popular items.
        assert_eq!(skus.first(), Some(&"acc"));
        assert_eq!(rec.items[0].reason, Reason::RecentlyViewedAccessory);

        // Anonymous: purchased/cart unknown, but out of stock and the current item still go.
        let rec = run(&catalog, &rules, None, &c);
        let skus = rec.skus(&catalog);
        assert!(
            !skus.contains(&"gone") && !skus.contains(&"viewing"),
            "{skus:?}"
        );
        assert!(
            skus.contains(&"bought") && skus.contains(&"carted"),
            "{skus:?}"
        );
    }

    #[test]
    fn rules_can_lift_or_add_exclusions() {
        let catalog = Catalog::from_toml(FILTER_CATALOG).expect("catalog");
        let p = filter_profile();
        let c = RequestContext {
            k: 50,
            ..ctx(Slot::Home)
        };
        let lift = CompiledRules::compile(
            "version = 1\n[[rule]]\nname = \"rebuy\"\nexclude = { purchased = false, in_cart = false }\n",
            &catalog,
        )
        .expect("rules");
        let skus = run(&catalog, &lift, Some(&p), &c).skus(&catalog);
        assert!(
            skus.contains(&"bought") && skus.contains(&"carted"),
            "{skus:?}"
        );
        assert!(!skus.contains(&"gone"));

        // An explicit `true` from another fired rule wins over `false`.
        let both = CompiledRules::compile(
            "version = 1\n[[rule]]\nname = \"rebuy\"\nexclude = { purchased = false }\n[[rule]]\nname = \"strict\"\nexclude = { purchased = true }\n",
            &catalog,
        )
        .expect("rules");
        let skus = run(&catalog, &both, Some(&p), &c).skus(&catalog);
        assert!(!skus.contains(&"bought"), "{skus:?}");

        let extra = CompiledRules::compile(
            "version = 1\n[[rule]]\nname = \"no-b\"\nexclude = { categories = [\"b\"], items = [\"top\"] }\n",
            &catalog,
        )
        .expect("rules");
        let skus = run(&catalog, &extra, None, &c).skus(&catalog);
        assert_eq!(skus, ["bought", "viewing", "low1"]);
    }
    #[test]
    fn sparse_tag_boosts_apply() {
        // More distinct tags than DENSE_TAG_LIMIT: boosts go through the sorted list.
        let n = DENSE_TAG_LIMIT + 10;
        let mut doc = String::from("version = 1\n[[category]]\nid = \"c\"\nname = \"C\"\n");
        for i in 0..n {
            doc.push_str(&format!(
                "[[item]]\nsku = \"i{i}\"\nname = \"I\"\ncategory = \"c\"\nprice = 1\npopularity = 0.5\ntags = [\"t{i}\"]\n"
            ));
        }
        let catalog = Catalog::from_toml(&doc).expect("catalog");
        assert!(catalog.tags().len() > DENSE_TAG_LIMIT);
        let rules = CompiledRules::compile(
            "version = 1\n[[rule]]\nname = \"r\"\nboost = [{ tag = \"t4000\", by = 2.0 }, { tag = \"t17\", by = 1.0 }, { tag = \"t17\", by = 0.5 }]\n",
            &catalog,
        )
        .expect("rules");
        let c = RequestContext {
            k: 3,
            ..ctx(Slot::Home)
        };
        let rec = run(&catalog, &rules, None, &c);
        assert_eq!(rec.skus(&catalog)[..2], ["i4000", "i17"]);
        assert_eq!(rec.items[0].reason, Reason::Rule);
        assert!((rec.items[0].score - 2.5).abs() < 1e-6);
        // Two boosts of the same tag add up (1.0 + 0.5), less the diversity penalty.
        assert!((rec.items[1].score - (2.0 - DIVERSITY_PENALTY)).abs() < 1e-6);
    }

    #[test]
    fn merge_sorted_sums_equal_keys() {
        let mut v = vec![(5, 1.0), (2, 0.5), (5, 2.0), (9, -1.0), (2, 0.25)];
        merge_sorted(&mut v);
        assert_eq!(v, [(2, 0.75), (5, 3.0), (9, -1.0)]);
    }
}
