//! Step 4 of a request: greedy top-k under a per-category diversity penalty, then the pins.
//!
//! Each additional pick from a category costs [`DIVERSITY_PENALTY`]. Candidates are bucketed by
//! category (a counting sort over dense category indexes, then tiny per-bucket sorts on one
//! integer key: score, tie hash, position), so each greedy step compares only the head of each
//! bucket. Pins go in last, at their positions, and obey the same filters as everything else.

use super::scoring::TIE_MASK;
use super::{DIVERSITY_PENALTY, Group, Reason, RecommendedItem, Request, Scored};
use crate::ids::ItemId;

impl<'a, 'p, 's> Request<'a, 'p, 's> {
    /// Greedy top-k with a per-category penalty. Candidates are grouped by category (best
    /// first inside each group), so each step compares only the group heads.
    pub(super) fn select(&mut self) -> Vec<RecommendedItem> {
        let s = &mut *self.s;
        let n_categories = self.catalog.categories.len();
        // Bucket candidates by category (counting sort: categories are dense indexes), then
        // order each small bucket by one integer key: score descending, tie hash, position.
        // The position (deterministic) makes the order total.
        s.bucket_start.clear();
        s.bucket_start.resize(n_categories + 1, 0);
        for c in &s.scored {
            if let Some(n) = s.bucket_start.get_mut(usize::from(c.category) + 1) {
                *n += 1;
            }
        }
        for i in 1..s.bucket_start.len() {
            let prev = s.bucket_start.get(i - 1).copied().unwrap_or(0);
            if let Some(n) = s.bucket_start.get_mut(i) {
                *n += prev;
            }
        }
        s.keys.clear();
        s.keys.resize(s.scored.len(), 0);
        s.fill.clear();
        s.fill.extend_from_slice(&s.bucket_start);
        for (pos, c) in s.scored.iter().enumerate() {
            if let Some(next) = s.fill.get_mut(usize::from(c.category))
                && let Some(key) = s.keys.get_mut(*next as usize)
            {
                *key = (u128::from(descending_bits(c.score)) << 80)
                    | (u128::from(c.tie & TIE_MASK) << 32)
                    | pos as u128;
                *next += 1;
            }
        }
        for w in s.bucket_start.windows(2) {
            if let [start, end] = *w
                && let Some(bucket) = s.keys.get_mut(start as usize..end as usize)
            {
                bucket.sort_unstable();
            }
        }
        let keys = &s.keys;
        let scored = &s.scored;
        let at = |i: u32| -> Option<&Scored> {
            keys.get(i as usize)
                .and_then(|k| scored.get((k & 0xffff_ffff) as usize))
        };
        // One group per non-empty category, caching its head so that each greedy step reads
        // one small array.
        let groups = &mut s.groups;
        groups.clear();
        for w in s.bucket_start.windows(2) {
            if let [start, end] = *w
                && start < end
                && let Some(c) = at(start)
            {
                groups.push(Group {
                    cursor: start,
                    end,
                    picked: 0,
                    eff: c.score,
                    tie: c.tie,
                    index: c.index,
                });
            }
        }
        let mut out = Vec::with_capacity(self.k);
        while out.len() < self.k {
            let mut best: Option<(usize, &Group)> = None;
            for (g, group) in groups.iter().enumerate() {
                if group.cursor >= group.end {
                    continue;
                }
                let wins = best.is_none_or(|(_, b)| {
                    better(group.eff, group.tie, group.index, b.eff, b.tie, b.index)
                        == std::cmp::Ordering::Less
                });
                if wins {
                    best = Some((g, group));
                }
            }
            let Some((g, head)) = best else { break };
            let (cursor, eff) = (head.cursor, head.eff);
            let Some(c) = at(cursor) else { break };
            out.push(RecommendedItem {
                item: self
                    .catalog
                    .hot
                    .get(c.index as usize)
                    .map_or(ItemId(0), |h| h.id),
                index: c.index,
                score: eff,
                reason: c.reason,
            });
            if let Some(group) = groups.get_mut(g) {
                group.cursor += 1;
                group.picked += 1;
                if let Some(next) = at(group.cursor).filter(|_| group.cursor < group.end) {
                    group.eff = next.score - DIVERSITY_PENALTY * group.picked as f32;
                    group.tie = next.tie;
                    group.index = next.index;
                }
            }
        }
        out
    }

    /// Places pinned items at their positions (higher-priority rules first; a later pin for a
    /// taken position goes right after it). Pins obey the same filters as everything else.
    pub(super) fn apply_pins(&self, items: &mut Vec<RecommendedItem>) {
        if self.s.pins.is_empty() {
            return;
        }
        let mut pinned: Vec<(u8, u32)> = Vec::with_capacity(self.s.pins.len());
        for &(pos, index) in &self.s.pins {
            if self.allowed(index) && !pinned.iter().any(|(_, i)| *i == index) {
                pinned.push((pos, index));
            }
        }
        if pinned.is_empty() {
            return;
        }
        items.retain(|r| !pinned.iter().any(|(_, i)| *i == r.index));
        pinned.sort_by_key(|(pos, _)| *pos); // stable: rule order within a position
        let mut next_free = 0usize;
        for (pos, index) in pinned {
            let at = usize::from(pos).max(next_free).min(items.len());
            if at >= self.k {
                continue;
            }
            let Some((score, _, _)) = self.score(index) else {
                continue;
            };
            items.insert(
                at,
                RecommendedItem {
                    item: self.id_of(index),
                    index,
                    score,
                    reason: Reason::Pinned,
                },
            );
            next_free = at + 1;
        }
        items.truncate(self.k);
    }
}

/// `Less` when `(s1, t1, i1)` ranks before `(s2, t2, i2)`: higher score, then lower tie hash,
/// then lower index.
fn better(s1: f32, t1: u64, i1: u32, s2: f32, t2: u64, i2: u32) -> std::cmp::Ordering {
    s2.total_cmp(&s1).then(t1.cmp(&t2)).then(i1.cmp(&i2))
}
/// Bits of `s` that sort (as unsigned integers) in descending order of `s`.
fn descending_bits(s: f32) -> u32 {
    let b = s.to_bits();
    let ascending = if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    };
    !ascending
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::context::{RequestContext, Slot};
    use crate::recommend::tests::{FILTER_CATALOG, ctx, run};
    use crate::rules::CompiledRules;

    #[test]
    fn diversity_spreads_categories() {
        // Category a's items are all more popular than b's; without a penalty, top-4 would be a.
        let mut doc = String::from(
            "version = 1\n[[category]]\nid = \"a\"\nname = \"A\"\n[[category]]\nid = \"b\"\nname = \"B\"\n",
        );
        for i in 0..6 {
            doc.push_str(&format!("[[item]]\nsku = \"a{i}\"\nname = \"A\"\ncategory = \"a\"\nprice = 1\npopularity = 0.9{i}\n"));
            doc.push_str(&format!("[[item]]\nsku = \"b{i}\"\nname = \"B\"\ncategory = \"b\"\nprice = 1\npopularity = 0.5{i}\n"));
        }
        let catalog = Catalog::from_toml(&doc).expect("catalog");
        let rules = CompiledRules::none(&catalog);
        let c = RequestContext {
            k: 4,
            ..ctx(Slot::Home)
        };
        let rec = run(&catalog, &rules, None, &c);
        // a5 (0.95), then b5 (0.55) beats a4 (0.94 - 0.75), then a4 (0.19) beats b4 (0.54 - 0.75).
        assert_eq!(rec.skus(&catalog), ["a5", "b5", "a4", "b4"]);
        // Selection scores never increase (the penalty only lowers later picks).
        assert!(rec.items.windows(2).all(|w| w[0].score >= w[1].score));
    }

    #[test]
    fn pins_take_their_positions() {
        let catalog = Catalog::from_toml(FILTER_CATALOG).expect("catalog");
        let rules = CompiledRules::compile(
            r#"version = 1
[[rule]]
name = "pin-low"
priority = 2
pin = [{ item = "low1", position = 1 }, { item = "gone", position = 0 }]
[[rule]]
name = "pin-low2"
priority = 1
pin = [{ item = "low2", position = 1 }, { item = "acc", position = 40 }]
"#,
            &catalog,
        )
        .expect("rules");
        let c = RequestContext {
            k: 5,
            ..ctx(Slot::Home)
        };
        let rec = run(&catalog, &rules, None, &c);
        let skus = rec.skus(&catalog);
        // Out-of-stock pin ignored; the higher-priority pin keeps position 1, the other follows.
        assert_eq!(skus.get(1), Some(&"low1"), "{skus:?}");
        assert_eq!(skus.get(2), Some(&"low2"), "{skus:?}");
        assert!(!skus.contains(&"gone"));
        assert_eq!(skus.len(), 5);
        assert_eq!(rec.items[1].reason, Reason::Pinned);
        // A pin beyond k is not shown; with a large k it lands at the end of a short list.
        assert!(!skus.contains(&"acc"));
        let c = RequestContext {
            k: 50,
            ..ctx(Slot::Home)
        };
        let skus = run(&catalog, &rules, None, &c).skus(&catalog);
        assert_eq!(skus.last(), Some(&"acc"), "{skus:?}");
        assert_eq!(skus.iter().filter(|s| **s == "low1").count(), 1);
    }

    #[test]
    fn descending_bits_order_floats() {
        // Descending bits order floats from largest to smallest, negatives included.
        let xs = [
            f32::INFINITY,
            3.5,
            1.0,
            0.0,
            -0.0,
            -1.0,
            -7.25,
            f32::NEG_INFINITY,
        ];
        for w in xs.windows(2) {
            assert!(descending_bits(w[0]) < descending_bits(w[1]), "{w:?}");
        }
    }
}
