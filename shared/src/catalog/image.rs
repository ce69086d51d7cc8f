//! The compiled catalog as a value that can be stored and loaded without compiling again.
//!
//! A catalog of 100k items takes about half a second to parse from JSON and compile natively
//! (more in wasm), and every new isolate at every location would pay it on the request that
//! wakes it. The image is what the compiler produced, minus what is cheap to derive: items and
//! categories with their references already resolved to dense indexes, the distinct tags, the
//! popularity order (the one sort of compiling) and the fingerprint. Loading it is decoding plus
//! linear passes: the per-category and per-tag lists are grouped from the popularity order,
//! and the packed hot fields, the id table and the category index are rebuilt.
//!
//! The bytes are framed and versioned by `crate::wire` (`encode_catalog`, `decode_catalog`).
//! They are produced by this compiler and travel a signed path into KV, so the checks in
//! [`Catalog::from_image`] guard against corruption and a build that disagrees, not against a
//! forger: every index is in range (so no lookup reads the wrong item), ids are the hashes of
//! their names, the popularity order is a sorted permutation, and the fingerprint recomputed
//! from the decoded names equals the one stored.

use super::index::{assemble, fingerprint, popularity_cmp};
use super::{
    CATALOG_VERSION, Catalog, Category, Item, MAX_ACCESSORIES_PER_ITEM, MAX_ACCESSORY_CATEGORIES,
    MAX_CATEGORIES, MAX_ITEMS, MAX_TAGS_PER_ITEM,
};
use crate::ids::{CategoryId, ItemId};
use serde::{Deserialize, Serialize};

/// Most distinct tags a catalog can have: every item's every tag distinct.
const MAX_TAGS: usize = MAX_ITEMS * MAX_TAGS_PER_ITEM;

/// What [`Catalog::image`] serializes: the catalog's own fields, borrowed.
#[derive(Debug, Serialize)]
pub struct CatalogImageRef<'a> {
    version: u32,
    categories: &'a [Category],
    items: &'a [Item],
    tags: &'a [String],
    popular: &'a [u32],
    id_collisions: &'a [(String, String)],
    fingerprint: u64,
}

/// A decoded image, not yet checked; [`Catalog::from_image`] checks it. Same fields, same
/// order as [`CatalogImageRef`]. Sequences whose elements are larger in memory than on the
/// wire are capped (`crate::bounded`).
#[derive(Debug, Deserialize)]
pub struct CatalogImage {
    version: u32,
    #[serde(deserialize_with = "crate::bounded::vec::<_, _, MAX_CATEGORIES>")]
    categories: Vec<Category>,
    #[serde(deserialize_with = "crate::bounded::vec::<_, _, MAX_ITEMS>")]
    items: Vec<Item>,
    #[serde(deserialize_with = "crate::bounded::vec::<_, _, MAX_TAGS>")]
    tags: Vec<String>,
    popular: Vec<u32>,
    #[serde(deserialize_with = "crate::bounded::vec::<_, _, MAX_ITEMS>")]
    id_collisions: Vec<(String, String)>,
    fingerprint: u64,
}

impl Catalog {
    /// The catalog as an image to serialize (see `crate::wire::encode_catalog`).
    pub fn image(&self) -> CatalogImageRef<'_> {
        CatalogImageRef {
            version: self.version,
            categories: &self.categories,
            items: &self.items,
            tags: &self.tags,
            popular: &self.popular,
            id_collisions: &self.id_collisions,
            fingerprint: self.fingerprint,
        }
    }

    /// The catalog an image holds, checked (see the module docs) and with its derived indexes
    /// rebuilt. The error says what is inconsistent.
    pub fn from_image(image: CatalogImage) -> Result<Catalog, String> {
        let CatalogImage {
            version,
            categories,
            items,
            tags,
            popular,
            id_collisions,
            fingerprint: stored_fingerprint,
        } = image;
        if i64::from(version) != CATALOG_VERSION {
            return Err(format!(
                "catalog format {version}; this build reads {CATALOG_VERSION}"
            ));
        }
        check_categories(&categories)?;
        check_items(&items, categories.len(), tags.len())?;
        if tags.windows(2).any(|w| matches!(w, [a, b] if a >= b)) {
            return Err("tags are not sorted and distinct".into());
        }
        check_popular(&popular, &items)?;
        let computed = fingerprint(version, &categories, &items, &tags);
        if computed != stored_fingerprint {
            return Err(format!(
                "fingerprint {computed:016x} of the decoded names is not the stored \
                 {stored_fingerprint:016x}"
            ));
        }
        Ok(assemble(
            version,
            categories,
            items,
            tags,
            popular,
            id_collisions,
            stored_fingerprint,
        ))
    }
}

fn check_categories(categories: &[Category]) -> Result<(), String> {
    let n = categories.len();
    for c in categories {
        if c.id != CategoryId::of_name(&c.slug) {
            return Err(format!("category {:?}: id is not its slug's hash", c.slug));
        }
        if c.accessory_categories.len() > MAX_ACCESSORY_CATEGORIES
            || c.accessory_categories.iter().any(|a| usize::from(*a) >= n)
        {
            return Err(format!(
                "category {:?}: accessory categories out of range",
                c.slug
            ));
        }
    }
    Ok(())
}

fn check_items(items: &[Item], n_categories: usize, n_tags: usize) -> Result<(), String> {
    let n = items.len();
    for it in items {
        let problem = if !it.text_is_consistent() {
            "text offsets out of order"
        } else if it.id != ItemId::of_sku(it.sku()) {
            "id is not its SKU's hash"
        } else if usize::from(it.category) >= n_categories {
            "category out of range"
        } else if usize::from(it.n_tags) > MAX_TAGS_PER_ITEM.min(it.refs.len())
            || it.tag_indexes().iter().any(|t| *t as usize >= n_tags)
        {
            "tags out of range"
        } else if it.accessory_indexes().len() > MAX_ACCESSORIES_PER_ITEM
            || it.accessory_indexes().iter().any(|a| *a as usize >= n)
        {
            "accessories out of range"
        } else {
            continue;
        };
        return Err(format!("item {:?}: {problem}", it.sku()));
    }
    Ok(())
}

/// `popular` holds every item index once, in popularity order.
fn check_popular(popular: &[u32], items: &[Item]) -> Result<(), String> {
    if popular.len() != items.len() {
        return Err(format!(
            "popularity order has {} entries for {} items",
            popular.len(),
            items.len()
        ));
    }
    let mut seen = vec![false; items.len()];
    let mut previous: Option<&Item> = None;
    for &i in popular {
        let (Some(it), Some(s)) = (items.get(i as usize), seen.get_mut(i as usize)) else {
            return Err(format!("popularity order names item {i}, out of range"));
        };
        if std::mem::replace(s, true) {
            return Err(format!("popularity order names item {i} twice"));
        }
        if previous.is_some_and(|p| popularity_cmp(p, it) != std::cmp::Ordering::Less) {
            return Err("popularity order is not sorted".into());
        }
        previous = Some(it);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::tests::parse;

    fn roundtrip(c: &Catalog) -> Result<Catalog, String> {
        let bytes = postcard::to_allocvec(&c.image()).map_err(|e| e.to_string())?;
        let image: CatalogImage = postcard::from_bytes(&bytes).map_err(|e| e.to_string())?;
        Catalog::from_image(image)
    }

    /// Everything a request reads through is the same after a round trip.
    #[test]
    fn image_restores_every_index() {
        let c = Catalog::from_toml(&crate::synthetic::catalog_toml(5000, 40, 9)).expect("valid");
        let d = roundtrip(&c).expect("round trip");
        assert_eq!(d.fingerprint(), c.fingerprint());
        assert_eq!(d.version(), c.version());
        let skus = |it: &mut dyn Iterator<Item = &Item>| {
            it.map(|i| i.sku().to_owned()).collect::<Vec<_>>()
        };
        assert_eq!(skus(&mut d.popular()), skus(&mut c.popular()));
        for (a, b) in c.categories().iter().zip(d.categories()) {
            assert_eq!(skus(&mut c.items_in(a)), skus(&mut d.items_in(b)));
            assert_eq!(a.accessory_categories, b.accessory_categories);
        }
        assert_eq!(c.items_by_tag, d.items_by_tag);
        assert_eq!(c.item_table, d.item_table);
        assert_eq!(c.category_index, d.category_index);
        assert_eq!(c.item_tags, d.item_tags);
        for it in c.items() {
            let other = d.item_by_sku(it.sku()).expect("same items");
            assert_eq!(format!("{it:?}"), format!("{other:?}"));
            assert_eq!(d.index_of(it.id()), c.index_of(it.id()));
        }
        // and the image of the image is the same bytes
        assert_eq!(
            postcard::to_allocvec(&c.image()).ok(),
            postcard::to_allocvec(&d.image()).ok()
        );
    }

    /// Each inconsistency an image could carry is refused, naming it.
    #[test]
    fn inconsistent_images_are_refused() {
        let c = parse(
            r#"
[[item]]
sku = "a"
name = "A"
category = "cameras"
price = 1
popularity = 0.9
tags = ["x"]
accessories = ["b"]
[[item]]
sku = "b"
name = "B"
category = "lenses"
price = 1
popularity = 0.5
"#,
        )
        .expect("valid");
        let refused = |edit: &dyn Fn(&mut Catalog), needle: &str| {
            let mut bad = c.clone();
            edit(&mut bad);
            let e = roundtrip(&bad).err().unwrap_or_default();
            assert!(e.contains(needle), "{needle:?} not in {e:?}");
        };
        refused(&|b| b.version = 2, "catalog format 2");
        refused(
            &|b| b.items[0].category = 9,
            "item \"a\": category out of range",
        );
        refused(&|b| b.items[0].refs[0] = 7, "item \"a\": tags out of range");
        refused(&|b| b.items[0].refs[1] = 2, "accessories out of range");
        refused(&|b| b.items[0].id = ItemId(1), "id is not its SKU's hash");
        refused(
            &|b| b.categories[0].accessory_categories = vec![5].into(),
            "accessory categories out of range",
        );
        refused(&|b| b.popular.swap(0, 1), "popularity order is not sorted");
        refused(&|b| b.popular[1] = b.popular[0], "twice");
        refused(&|b| b.popular.truncate(1), "1 entries for 2 items");
        refused(&|b| b.popular[0] = 40, "item 40, out of range");
        refused(&|b| b.tags.push("a".into()), "tags are not sorted");
        refused(
            &|b| b.items[0].ends = [2, 1, 2],
            "text offsets out of order",
        );
        refused(&|b| b.items[0].ends[2] = 9, "text offsets out of order");
        // an offset inside a character
        refused(
            &|b| {
                b.items[0].text = "a\u{e9}".into();
                b.items[0].ends = [1, 2, 3];
            },
            "text offsets out of order",
        );
        refused(&|b| b.items[1].n_tags = 3, "item \"b\": tags out of range");
        refused(
            &|b| {
                let it = b.items[1].clone();
                b.items[1] = Item::new(
                    "c",
                    it.name(),
                    None,
                    None,
                    it.category,
                    it.price,
                    it.popularity,
                    it.in_stock,
                    &[],
                    &[],
                );
            },
            "fingerprint",
        );
        assert!(roundtrip(&c).is_ok());
    }
}
