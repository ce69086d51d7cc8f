//! The indexes a compiled catalog is read through, built once from its validated items.
//!
//! Requests read these, never the item list in declaration order: each category's and tag's
//! items and the whole catalog sorted by popularity (ties by SKU, so the order is total and the
//! same everywhere), the per-candidate fields packed 16 bytes per item so scoring ten thousand
//! items stays in cache, an open-addressing table from item id to dense index, categories by
//! id, and the fingerprint that ties compiled rules to this catalog. Every input is already
//! validated (`compile`), so these only arrange; none of them can fail.

use super::{Category, EMPTY, Hot, Item, Items, table_slot};
use crate::ids::{CategoryId, Fnv1a64};

/// All item indexes, most popular first, ties by SKU (a total order, the same everywhere).
pub(super) fn popularity_order(items: &Items) -> Vec<u32> {
    let mut popular: Vec<u32> = (0..items.len()).map(|i| i as u32).collect();
    // a total order: the unstable sort gives the one result
    crate::sort::sort_unstable_by(&mut popular, |a, b| {
        match (items.get(*a as usize), items.get(*b as usize)) {
            (Some(x), Some(y)) => popularity_cmp(x, y),
            _ => a.cmp(b),
        }
        .is_lt()
    });
    popular
}

/// The popularity order between two items: more popular first, ties by SKU.
pub(super) fn popularity_cmp(x: Item<'_>, y: Item<'_>) -> std::cmp::Ordering {
    y.popularity()
        .total_cmp(&x.popularity())
        .then_with(|| x.sku().cmp(y.sku()))
}

/// Each category's items (stored in `categories`) and each tag's items (returned), in the order
/// of `popular`: one pass, no sort. Reads the packed fields (`hot`, `item_tags`), not the
/// items: `popular` visits items in no particular memory order, and 16 bytes per item stay in
/// cache where whole items (and their tag lists behind a pointer) do not; at 100k items that
/// is most of the cost of assembling.
fn group_by_popularity(
    popular: &[u32],
    hot: &[Hot],
    item_tags: &[u32],
    categories: &mut [Category],
    n_tags: usize,
) -> Vec<Box<[u32]>> {
    let tags_of = |h: &Hot| {
        let start = h.tags_at as usize;
        item_tags
            .get(start..start + usize::from(h.n_tags))
            .unwrap_or(&[])
    };
    // counted first, so each list is allocated once at its size (a new isolate loading a
    // large catalog spends its time allocating otherwise)
    let mut category_len = vec![0usize; categories.len()];
    let mut tag_len = vec![0usize; n_tags];
    for h in hot {
        if let Some(n) = category_len.get_mut(usize::from(h.category)) {
            *n += 1;
        }
    }
    for t in item_tags {
        if let Some(n) = tag_len.get_mut(*t as usize) {
            *n += 1;
        }
    }
    let mut per_category: Vec<Vec<u32>> =
        category_len.into_iter().map(Vec::with_capacity).collect();
    let mut per_tag: Vec<Vec<u32>> = tag_len.into_iter().map(Vec::with_capacity).collect();
    for &i in popular {
        if let Some(h) = hot.get(i as usize) {
            if let Some(v) = per_category.get_mut(usize::from(h.category)) {
                v.push(i);
            }
            for t in tags_of(h) {
                if let Some(v) = per_tag.get_mut(*t as usize) {
                    v.push(i);
                }
            }
        }
    }
    for (c, v) in categories.iter_mut().zip(per_category) {
        c.items = v.into_boxed_slice();
    }
    per_tag.into_iter().map(Vec::into_boxed_slice).collect()
}

/// The catalog from its validated parts and its popularity order: the per-category and
/// per-tag lists, the packed hot fields, the id table and the category index are derived
/// here, the same way for a compiled document and for a loaded image.
pub(super) fn assemble(
    version: u32,
    mut categories: Vec<Category>,
    items: Items,
    tags: Vec<String>,
    popular: Vec<u32>,
    id_collisions: Vec<(String, String)>,
    fingerprint: u64,
) -> super::Catalog {
    let (hot, item_tags) = pack_hot(&items);
    let items_by_tag = group_by_popularity(&popular, &hot, &item_tags, &mut categories, tags.len());
    let item_table = build_item_table(&items);
    let category_index = build_category_index(&categories);
    super::Catalog {
        version,
        categories,
        items,
        item_table,
        category_index,
        popular,
        tags,
        items_by_tag,
        fingerprint,
        hot,
        id_collisions,
        item_tags,
    }
}

/// The per-candidate fields of every item, packed, and all items' tag indexes concatenated
/// (which [`Hot::tags_at`] and [`Hot::n_tags`] slice).
fn pack_hot(items: &Items) -> (Vec<Hot>, Vec<u32>) {
    let mut item_tags: Vec<u32> = Vec::new();
    let hot: Vec<Hot> = items
        .iter()
        .map(|it| {
            let tags_at = u32::try_from(item_tags.len()).unwrap_or(u32::MAX);
            item_tags.extend_from_slice(it.tag_indexes());
            Hot {
                popularity: it.rec.popularity,
                id: it.rec.id,
                tags_at,
                category: it.rec.category,
                // At most MAX_TAGS_PER_ITEM (16), checked by the compiler.
                n_tags: it.rec.n_tags,
                in_stock: it.rec.in_stock,
            }
        })
        .collect();
    (hot, item_tags)
}

/// The open-addressing table from [`ItemId`](crate::ids::ItemId) to dense index, at most half
/// full. An id that collides with an earlier item's (tolerated by the compiler) probes on past
/// it, so a lookup by that id finds the earlier item.
fn build_item_table(items: &Items) -> Vec<u32> {
    let capacity = (items.len() * 2).max(16).next_power_of_two();
    let mut item_table = vec![EMPTY; capacity];
    let mask = capacity - 1;
    for (i, it) in items.records.iter().enumerate() {
        let mut slot = table_slot(it.id, mask);
        while item_table.get(slot).is_some_and(|s| *s != EMPTY) {
            slot = (slot + 1) & mask;
        }
        if let Some(s) = item_table.get_mut(slot) {
            *s = i as u32;
        }
    }
    item_table
}

/// `(id, dense index)` of every category, sorted by id.
fn build_category_index(categories: &[Category]) -> Vec<(CategoryId, u16)> {
    let mut category_index: Vec<(CategoryId, u16)> = categories
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id, u16::try_from(i).unwrap_or(u16::MAX)))
        .collect();
    crate::sort::sort_unstable(&mut category_index);
    category_index
}

/// A hash of everything dense indexes depend on: the version, then categories, SKUs and tags
/// in index order (see [`Catalog::fingerprint`](super::Catalog::fingerprint)). FNV-1a 64 over
/// the fields, each followed by a `0xff` byte.
pub(super) fn fingerprint(
    version: u32,
    categories: &[Category],
    items: &Items,
    tags: &[String],
) -> u64 {
    let mut h = fingerprint_head(version, categories);
    for it in items.iter() {
        field(&mut h, it.sku().as_bytes());
    }
    fingerprint_tail(h, tags)
}

/// The fingerprint up to the items: the version and the categories. A loaded image feeds
/// each item's SKU with [`field`] in the pass that checks the item (its text is in cache
/// then), and finishes with [`fingerprint_tail`]; [`fingerprint`] is the same three steps.
pub(super) fn fingerprint_head(version: u32, categories: &[Category]) -> Fnv1a64 {
    let mut h = Fnv1a64::new();
    field(&mut h, &version.to_le_bytes());
    for c in categories {
        field(&mut h, c.slug.as_bytes());
    }
    field(&mut h, b"--items--");
    h
}

/// The fingerprint's tags, after every SKU; the finished hash.
pub(super) fn fingerprint_tail(mut h: Fnv1a64, tags: &[String]) -> u64 {
    field(&mut h, b"--tags--");
    for t in tags {
        field(&mut h, t.as_bytes());
    }
    h.finish()
}

/// Feeds one field of the fingerprint, then a separator so that ("ab", "c") and ("a", "bc")
/// differ.
pub(super) fn field(h: &mut Fnv1a64, bytes: &[u8]) {
    h.write(bytes);
    h.write(&[0xff]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::catalog::tests::{CAM, parse};
    use crate::ids::ItemId;
    use std::collections::BTreeSet;

    #[test]
    fn popularity_orders_ties_by_sku() {
        let c = parse(
            r#"
[[item]]
sku = "b"
name = "B"
category = "lenses"
price = 1
popularity = 0.5
[[item]]
sku = "a"
name = "A"
category = "lenses"
price = 1
popularity = 0.5
[[item]]
sku = "c"
name = "C"
category = "lenses"
price = 1
popularity = 0.9
"#,
        )
        .expect("valid");
        let lenses = c.category_by_slug("lenses").expect("lenses");
        assert_eq!(
            c.items_in(lenses).map(Item::sku).collect::<Vec<_>>(),
            ["c", "a", "b"]
        );
        assert_eq!(
            c.popular().map(Item::sku).collect::<Vec<_>>(),
            ["c", "a", "b"]
        );
    }

    #[test]
    fn indexes_agree_with_items() {
        let c = Catalog::from_toml(&crate::synthetic::catalog_toml(5000, 30, 3)).expect("valid");
        for (i, it) in c.items().enumerate() {
            assert_eq!(c.index_of(it.id()), Some(i));
            assert_eq!(c.item_by_sku(it.sku()).map(Item::sku), Some(it.sku()));
            let h = c.hot.get(i).expect("hot");
            assert_eq!(
                (h.id, h.category, h.in_stock),
                (it.id(), it.rec.category, it.in_stock())
            );
            assert_eq!(h.popularity, it.popularity());
            assert_eq!(c.hot_tags(h), it.tag_indexes());
        }
        let known: BTreeSet<ItemId> = c.items().map(Item::id).collect();
        let mut misses = 0;
        for x in 0..20_000u32 {
            let id = ItemId(x.wrapping_mul(2_654_435_761));
            if !known.contains(&id) {
                assert_eq!(c.index_of(id), None);
                misses += 1;
            }
        }
        assert!(misses > 19_000);
        let empty = Catalog::from_toml("version = 1\n").expect("empty");
        assert_eq!(empty.index_of(ItemId(1)), None);
        assert!(empty.is_empty());
    }
    #[test]
    fn fingerprint_tracks_indexes() {
        let a = parse(CAM).expect("valid");
        let b = parse(CAM).expect("valid");
        assert_eq!(a.fingerprint(), b.fingerprint());
        let c = parse(&CAM.replace("lens-014", "lens-015")).expect("valid");
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    /// The fingerprint is FNV-1a 64 over version, slugs, SKUs and tags, each followed by 0xff:
    /// pinned here byte by byte, since rules compiled by one build are checked against
    /// catalogs compiled by another.
    #[test]
    fn fingerprint_is_fnv1a64_of_the_framed_fields() {
        let c = parse(CAM).expect("valid");
        let mut bytes: Vec<u8> = Vec::new();
        let fields: [&[u8]; 9] = [
            &1u32.to_le_bytes(),
            b"cameras",
            b"lenses",
            b"--items--",
            b"cam-001",
            b"lens-014",
            b"--tags--",
            b"4k",
            b"mirrorless",
        ];
        for f in fields {
            bytes.extend_from_slice(f);
            bytes.push(0xff);
        }
        assert_eq!(c.fingerprint(), crate::ids::fnv1a64(&bytes));
    }
}
