//! The compiled catalog as a value that can be stored and loaded without compiling again.
//!
//! A catalog of 100k items takes about half a second to parse from JSON and compile natively
//! (more in wasm), and every new isolate at every location would pay it on the request that
//! wakes it. The image is what the compiler produced, minus what is cheap to derive: items and
//! categories with their references already resolved to dense indexes, the distinct tags, the
//! popularity order (the one sort of compiling) and the fingerprint. Loading it is decoding plus
//! linear passes: the per-category and per-tag lists are grouped from the popularity order,
//! and the packed hot fields, the id table and the category index are rebuilt. Items are
//! decoded straight into the catalog's shared text and reference buffers, with no allocation
//! per item (at 100k items the allocations were most of the decoding); on the wire each item
//! still carries its own text and references, as images always have.
//!
//! The bytes are framed and versioned by `crate::wire` (`encode_catalog`, `decode_catalog`).
//! They are produced by this compiler and travel a signed path into KV, so the checks in
//! [`Catalog::from_image`] guard against corruption and a build that disagrees, not against a
//! forger: every index is in range (so no lookup reads the wrong item), ids are the hashes of
//! their names, the popularity order is a sorted permutation, and the fingerprint recomputed
//! from the decoded names equals the one stored.

use super::index::{assemble, field, fingerprint_head, fingerprint_tail};
use super::{
    CATALOG_VERSION, Catalog, Category, ItemRecord, Items, MAX_ACCESSORIES_PER_ITEM,
    MAX_ACCESSORY_CATEGORIES, MAX_CATEGORIES, MAX_ITEMS, MAX_TAGS_PER_ITEM,
};
use crate::ids::{CategoryId, ItemId};
use serde::de::{DeserializeSeed, Error as _, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Most distinct tags a catalog can have: every item's every tag distinct.
const MAX_TAGS: usize = MAX_ITEMS * MAX_TAGS_PER_ITEM;

/// What [`Catalog::image`] serializes: the catalog's own fields, borrowed.
#[derive(Debug, Serialize)]
pub struct CatalogImageRef<'a> {
    version: u32,
    categories: &'a [Category],
    items: ItemsOut<'a>,
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
    /// Capped at [`MAX_ITEMS`] by its own decoder.
    items: Items,
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
            items: ItemsOut(&self.items),
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
        // one pass over the items checks each and feeds its SKU to the fingerprint while its
        // text is in cache (a new isolate loading 100k items pays for every pass over them)
        let mut hash = fingerprint_head(version, &categories);
        check_items(&items, categories.len(), tags.len(), |sku| {
            field(&mut hash, sku.as_bytes())
        })?;
        if tags.windows(2).any(|w| matches!(w, [a, b] if a >= b)) {
            return Err("tags are not sorted and distinct".into());
        }
        let computed = fingerprint_tail(hash, &tags);
        if computed != stored_fingerprint {
            return Err(format!(
                "fingerprint {computed:016x} of the decoded names is not the stored \
                 {stored_fingerprint:016x}"
            ));
        }
        if popular.len() != items.len() {
            return Err(format!(
                "popularity order has {} entries for {} items",
                popular.len(),
                items.len()
            ));
        }
        // Assembled before the popularity order is checked: the check reads the packed
        // fields, and assembling tolerates any order (an index out of range is skipped).
        let catalog = assemble(
            version,
            categories,
            items,
            tags,
            popular,
            id_collisions,
            stored_fingerprint,
        );
        check_popular(&catalog)?;
        Ok(catalog)
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

/// Checks every item; `each_sku` sees every SKU, in order, until a check fails.
fn check_items(
    items: &Items,
    n_categories: usize,
    n_tags: usize,
    mut each_sku: impl FnMut(&str),
) -> Result<(), String> {
    let n = items.len();
    for it in items.iter() {
        let problem = if !it.text_is_consistent() {
            "text offsets out of order"
        } else if it.id() != ItemId::of_sku(it.sku()) {
            "id is not its SKU's hash"
        } else if it.category_index() >= n_categories {
            "category out of range"
        } else if usize::from(it.rec.n_tags) > MAX_TAGS_PER_ITEM.min(it.refs().len())
            || it.tag_indexes().iter().any(|t| *t as usize >= n_tags)
        {
            "tags out of range"
        } else if it.accessory_indexes().len() > MAX_ACCESSORIES_PER_ITEM
            || it.accessory_indexes().iter().any(|a| *a as usize >= n)
        {
            "accessories out of range"
        } else {
            each_sku(it.sku());
            continue;
        };
        return Err(format!("item {:?}: {problem}", it.sku()));
    }
    Ok(())
}

/// `popular` holds every item index once, most popular first. Reads only the packed
/// popularity (`hot`, 16 bytes per item, in cache): the order visits items in no particular
/// memory order, and reading their SKUs to check how ties are broken was a cache miss per
/// tie — a fifth of loading a 100k-item image. Ties are trusted as the image orders them: the
/// compiler breaks them by SKU, every isolate reads the same image, and any order of equals
/// is a valid answer, so a wrong one could not make a recommendation inconsistent or unsafe.
fn check_popular(c: &Catalog) -> Result<(), String> {
    let mut seen = vec![false; c.items.len()];
    let mut previous = f32::INFINITY;
    for &i in &c.popular {
        let (Some(h), Some(s)) = (c.hot.get(i as usize), seen.get_mut(i as usize)) else {
            return Err(format!("popularity order names item {i}, out of range"));
        };
        if std::mem::replace(s, true) {
            return Err(format!("popularity order names item {i} twice"));
        }
        if h.popularity.total_cmp(&previous).is_gt() {
            return Err("popularity order is not sorted".into());
        }
        previous = h.popularity;
    }
    Ok(())
}

/// One item as an image holds it. Images have had this layout since each item owned its text
/// and references, so images of either build decode in the other.
#[derive(Serialize)]
struct ItemOut<'a> {
    id: ItemId,
    text: &'a str,
    ends: [u32; 3],
    has: u8,
    category: u16,
    price: f64,
    popularity: f32,
    in_stock: bool,
    refs: &'a [u32],
    n_tags: u8,
}

/// The items of an image, serialized one [`ItemOut`] after another.
#[derive(Debug)]
struct ItemsOut<'a>(&'a Items);

impl Serialize for ItemsOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|it| ItemOut {
            id: it.rec.id,
            text: it.text,
            ends: it.rec.ends,
            has: it.rec.has,
            category: it.rec.category,
            price: it.rec.price,
            popularity: it.rec.popularity,
            in_stock: it.rec.in_stock,
            refs: it.refs,
            n_tags: it.rec.n_tags,
        }))
    }
}

/// The items of an image, decoded straight into one [`Items`]: each item's text and
/// references are appended to the shared buffers, so decoding allocates nothing per item.
impl<'de> Deserialize<'de> for Items {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Items, D::Error> {
        struct ItemsVisitor;
        impl<'de> Visitor<'de> for ItemsVisitor {
            type Value = Items;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a sequence of at most {MAX_ITEMS} items")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Items, A::Error> {
                let too_many = || A::Error::custom(format!("more than {MAX_ITEMS} items"));
                let n = seq.size_hint().unwrap_or(0);
                if n > MAX_ITEMS {
                    return Err(too_many());
                }
                let mut items = Items::with_capacity(n);
                while seq.next_element_seed(ItemSeed(&mut items))?.is_some() {
                    if items.len() > MAX_ITEMS {
                        return Err(too_many());
                    }
                }
                Ok(items)
            }
        }
        deserializer.deserialize_seq(ItemsVisitor)
    }
}

/// Field names of [`ItemOut`], for formats that ask.
const ITEM_FIELDS: &[&str] = &[
    "id",
    "text",
    "ends",
    "has",
    "category",
    "price",
    "popularity",
    "in_stock",
    "refs",
    "n_tags",
];

/// Decodes one [`ItemOut`] onto the end of an [`Items`].
struct ItemSeed<'i>(&'i mut Items);

impl<'de> DeserializeSeed<'de> for ItemSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_struct("Item", ITEM_FIELDS, self)
    }
}

impl<'de> Visitor<'de> for ItemSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an item")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let items = self.0;
        let field = |i: usize| A::Error::invalid_length(i, &"an item's 10 fields");
        let id: ItemId = seq.next_element()?.ok_or_else(|| field(0))?;
        let text_at = items.text.len();
        seq.next_element_seed(AppendText(&mut items.text))?
            .ok_or_else(|| field(1))?;
        let ends: [u32; 3] = seq.next_element()?.ok_or_else(|| field(2))?;
        let has: u8 = seq.next_element()?.ok_or_else(|| field(3))?;
        let category: u16 = seq.next_element()?.ok_or_else(|| field(4))?;
        let price: f64 = seq.next_element()?.ok_or_else(|| field(5))?;
        let popularity: f32 = seq.next_element()?.ok_or_else(|| field(6))?;
        let in_stock: bool = seq.next_element()?.ok_or_else(|| field(7))?;
        let refs_at = items.refs.len();
        seq.next_element_seed(AppendRefs(&mut items.refs))?
            .ok_or_else(|| field(8))?;
        let n_tags: u8 = seq.next_element()?.ok_or_else(|| field(9))?;
        let span = |at: usize, end: usize| {
            let at = u32::try_from(at).map_err(|_| A::Error::custom("catalog too large"))?;
            let len = u32::try_from(end - at as usize)
                .map_err(|_| A::Error::custom("catalog too large"))?;
            Ok::<_, A::Error>((at, len))
        };
        let (text_at, text_len) = span(text_at, items.text.len())?;
        let (refs_at, refs_len) = span(refs_at, items.refs.len())?;
        items.records.push(ItemRecord {
            id,
            text_at,
            text_len,
            ends,
            has,
            category,
            price,
            popularity,
            in_stock,
            refs_at,
            refs_len,
            n_tags,
        });
        Ok(())
    }
}

/// Appends a string to the catalog's text.
struct AppendText<'t>(&'t mut String);

impl<'de> DeserializeSeed<'de> for AppendText<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for AppendText<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an item's text")
    }
    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<(), E> {
        self.0.push_str(text);
        Ok(())
    }
}

/// Appends a sequence of references to the catalog's.
struct AppendRefs<'r>(&'r mut Vec<u32>);

impl<'de> DeserializeSeed<'de> for AppendRefs<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for AppendRefs<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an item's references")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(r) = seq.next_element::<u32>()? {
            self.0.push(r);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Item;
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
        let skus =
            |it: &mut dyn Iterator<Item = Item>| it.map(|i| i.sku().to_owned()).collect::<Vec<_>>();
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

    /// Images keep the layout of the builds whose items each owned their text and references:
    /// an image one of them published decodes here, and the other way round.
    #[test]
    fn image_layout_is_the_one_of_items_owning_their_text() {
        #[derive(Serialize)]
        struct OwnedItem {
            id: ItemId,
            text: Box<str>,
            ends: [u32; 3],
            has: u8,
            category: u16,
            price: f64,
            popularity: f32,
            in_stock: bool,
            refs: Box<[u32]>,
            n_tags: u8,
        }
        #[derive(Serialize)]
        struct OwnedImage<'a> {
            version: u32,
            categories: &'a [Category],
            items: Vec<OwnedItem>,
            tags: &'a [String],
            popular: &'a [u32],
            id_collisions: &'a [(String, String)],
            fingerprint: u64,
        }
        let c = Catalog::from_toml(&crate::synthetic::catalog_toml(300, 12, 5)).expect("valid");
        let owned = OwnedImage {
            version: c.version,
            categories: &c.categories,
            items: c
                .items()
                .map(|it| OwnedItem {
                    id: it.rec.id,
                    text: it.text.into(),
                    ends: it.rec.ends,
                    has: it.rec.has,
                    category: it.rec.category,
                    price: it.rec.price,
                    popularity: it.rec.popularity,
                    in_stock: it.rec.in_stock,
                    refs: it.refs.into(),
                    n_tags: it.rec.n_tags,
                })
                .collect(),
            tags: &c.tags,
            popular: &c.popular,
            id_collisions: &c.id_collisions,
            fingerprint: c.fingerprint,
        };
        let bytes = postcard::to_allocvec(&owned).expect("encodes");
        assert_eq!(
            Some(&bytes),
            postcard::to_allocvec(&c.image()).ok().as_ref()
        );
        let image: CatalogImage = postcard::from_bytes(&bytes).expect("decodes");
        let d = Catalog::from_image(image).expect("consistent");
        assert_eq!(
            d.items().map(Item::sku).collect::<Vec<_>>(),
            c.items().map(Item::sku).collect::<Vec<_>>()
        );
    }

    /// An image that claims more items than a catalog may hold is refused while decoding,
    /// before its items are stored.
    #[test]
    fn an_image_of_too_many_items_is_refused() {
        #[derive(Serialize)]
        struct Image<'a> {
            version: u32,
            categories: &'a [Category],
            items: Vec<ItemOut<'a>>,
            tags: &'a [String],
            popular: &'a [u32],
            id_collisions: &'a [(String, String)],
            fingerprint: u64,
        }
        let item = || ItemOut {
            id: ItemId::of_sku("a"),
            text: "aA",
            ends: [1, 2, 2],
            has: 0,
            category: 0,
            price: 1.0,
            popularity: 0.5,
            in_stock: true,
            refs: &[],
            n_tags: 0,
        };
        let bytes = postcard::to_allocvec(&Image {
            version: 1,
            categories: &[],
            items: (0..=MAX_ITEMS).map(|_| item()).collect(),
            tags: &[],
            popular: &[],
            id_collisions: &[],
            fingerprint: 0,
        })
        .expect("encodes");
        let e = postcard::from_bytes::<CatalogImage>(&bytes)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!e.is_empty(), "decoded an image of {} items", MAX_ITEMS + 1);
    }

    /// Ties in popularity are loaded in the order the image holds them (not checked against
    /// the compiler's SKU order: see `check_popular`); a lower item before a higher one is not.
    #[test]
    fn ties_load_in_the_images_order() {
        let c = parse(
            r#"
[[item]]
sku = "a"
name = "A"
category = "lenses"
price = 1
popularity = 0.5
[[item]]
sku = "b"
name = "B"
category = "lenses"
price = 1
popularity = 0.5
"#,
        )
        .expect("valid");
        let mut swapped = c.clone();
        swapped.popular.swap(0, 1);
        let d = roundtrip(&swapped).expect("a tie in either order loads");
        assert_eq!(d.popular().map(Item::sku).collect::<Vec<_>>(), ["b", "a"]);
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
            &|b| b.items.records[0].category = 9,
            "item \"a\": category out of range",
        );
        // item "a"'s references are the first: its tag, then its accessory
        refused(&|b| b.items.refs[0] = 7, "item \"a\": tags out of range");
        refused(&|b| b.items.refs[1] = 2, "accessories out of range");
        refused(
            &|b| b.items.records[0].id = ItemId(1),
            "id is not its SKU's hash",
        );
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
            &|b| b.items.records[0].ends = [2, 1, 2],
            "text offsets out of order",
        );
        refused(
            &|b| b.items.records[0].ends[2] = 9,
            "text offsets out of order",
        );
        // an offset inside a character: item "a"'s text (the first) becomes "a" + "é"
        refused(
            &|b| {
                let old = b.items.records[0].text_len;
                b.items.text.replace_range(..old as usize, "a\u{e9}");
                b.items.records[0].text_len = 3;
                b.items.records[0].ends = [1, 2, 3];
                b.items.records[1].text_at = b.items.records[1].text_at + 3 - old;
            },
            "text offsets out of order",
        );
        refused(
            &|b| b.items.records[1].n_tags = 3,
            "item \"b\": tags out of range",
        );
        // item "b" renamed "c" (its id with it): every check passes but the fingerprint
        refused(
            &|b| {
                let at = b.items.records[1].text_at as usize;
                b.items.text.replace_range(at..at + 1, "c");
                b.items.records[1].id = ItemId::of_sku("c");
            },
            "fingerprint",
        );
        assert!(roundtrip(&c).is_ok());
    }
}
