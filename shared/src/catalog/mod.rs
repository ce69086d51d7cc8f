//! The product catalog: a declarative, versioned TOML document compiled once into indexes.
//!
//! Why it is shaped this way:
//!
//! * **TOML, validated up front.** Merchandisers edit the catalog by hand, so every mistake is
//!   reported at load time with the item or category, the field, and what to do about it
//!   (`item "cam-001": field "category": unknown category "camras"; use the id of a
//!   [[category]] in the catalog`). The recommender then works on a catalog that is known to
//!   be consistent and never has to handle a dangling reference.
//! * **Hashed ids are checked here.** Profiles refer to items and categories by
//!   [`ItemId::of_sku`] and [`CategoryId::of_name`] hashes (see [`crate::ids`]). Two names
//!   that hash alike would silently share interest and cart state, so the compiler rejects them
//!   and names both.
//! * **Compiled for the hot path.** A recommendation must cost microseconds on a 10k-item
//!   catalog, so the compiled form holds dense indexes: items and categories are addressed by
//!   position (`u32` / `u16`, at most [`MAX_CATEGORIES`] categories); item ids resolve through
//!   an open-addressing table (ids are already hashes; one or two probes) and category ids
//!   through a sorted vector, both deterministic, unlike a randomly seeded `HashMap`; each
//!   category and tag keeps its items sorted by popularity; accessory relations are resolved
//!   to indexes; and the per-candidate fields (popularity, id, category, stock, tags) are
//!   packed in a separate 16-byte-per-item array so scoring touches little memory. Nothing in
//!   here iterates a hash map, so results never depend on iteration order.
//! * **A fingerprint ties rules to the catalog.** Compiled rules refer to dense indexes of one
//!   catalog; [`Catalog::fingerprint`] lets the recommender refuse a mismatched pair instead of
//!   reading the wrong items.
//!
//! The code follows those seams. `error` holds the catalog's problem vocabulary and its
//! messages (the part shared with the rules, [`FieldProblem`], lives in [`crate::problem`]);
//! `raw` the serde shape of a document as written; `compile` the validation, one function per
//! phase; `index` the indexes built from the validated items. This file keeps the compiled
//! form, its lookups and the public API, and re-exports what the submodules define (and
//! [`FieldProblem`]), so every path stays `crate::catalog::…`.

mod compile;
mod error;
mod image;
mod index;
mod raw;

pub use crate::problem::FieldProblem;
#[cfg(feature = "toml")]
use crate::problem::toml_position;
pub use error::{CatalogError, Problem, Subject};
pub use image::{CatalogImage, CatalogImageRef};

use crate::ids::{CategoryId, ItemId};
use compile::compile;
use raw::RawCatalog;
use serde::{Deserialize, Serialize};

/// The catalog format version this build reads.
pub const CATALOG_VERSION: i64 = 1;
/// Most items a catalog may hold.
pub const MAX_ITEMS: usize = 100_000;
/// Most categories a catalog may hold (dense category indexes fit comfortably in a `u16`).
pub const MAX_CATEGORIES: usize = 1024;
pub use crate::ids::{MAX_SKU_LEN, MAX_SLUG_LEN, is_sku, is_slug};
/// Longest display name.
pub const MAX_NAME_LEN: usize = 200;
/// Longest description.
pub const MAX_DESCRIPTION_LEN: usize = 4000;
/// Longest image reference.
pub const MAX_IMAGE_LEN: usize = 2048;
/// Most tags on one item.
pub const MAX_TAGS_PER_ITEM: usize = 16;
/// Most accessories listed on one item.
pub const MAX_ACCESSORIES_PER_ITEM: usize = 64;
/// Most accessory categories listed on one category.
pub const MAX_ACCESSORY_CATEGORIES: usize = 32;
/// Highest accepted price, in currency units.
pub const MAX_PRICE: f64 = 1_000_000_000.0;

/// The demo store's catalog (a few hundred products), compiled by tests and used by the demo.
pub const DEMO_CATALOG: &str = include_str!("../../data/catalog.toml");
/// [`DEMO_CATALOG`] in its JSON form (generated from it at build time).
pub const DEMO_CATALOG_JSON: &str = include_str!(concat!(env!("OUT_DIR"), "/catalog.json"));

/// Converts a TOML document (catalog or rules) to the JSON form that is published to the edge.
/// Validate it first ([`Catalog::from_toml`], `CompiledRules::compile`); this only re-encodes.
#[cfg(feature = "toml")]
pub fn toml_to_json(text: &str) -> Result<String, String> {
    let value: toml::Value = toml::from_str(text).map_err(|e| e.message().to_owned())?;
    serde_json::to_string(&value).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Compiled form
// ---------------------------------------------------------------------------------------------

/// One category of a compiled catalog. Serialized as part of a catalog image (`image`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Category {
    pub(crate) slug: String,
    pub(crate) name: String,
    pub(crate) id: CategoryId,
    pub(crate) description: Option<String>,
    /// Dense indexes of accessory categories, as declared (deduplicated).
    pub(crate) accessory_categories: Box<[u16]>,
    /// Dense item indexes, most popular first (ties by SKU). Derived, so not in an image.
    #[serde(skip)]
    pub(crate) items: Box<[u32]>,
}

impl Category {
    /// The category's id as written in TOML (`"cameras"`).
    pub fn slug(&self) -> &str {
        &self.slug
    }
    /// The display name (`"Cameras"`).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The compact id profiles use: `CategoryId::of_name(slug)`.
    pub fn id(&self) -> CategoryId {
        self.id
    }
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }
    /// How many items the category holds.
    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Every item of a compiled catalog: the fixed fields per item, and all items' text and
/// references each back to back in one allocation.
///
/// A new isolate decodes the catalog on the request that wakes it. Two allocations per item
/// (its text, its references) made a 100k-item catalog cost 200k allocations to decode and as
/// many frees to replace; here it is three, and an item's text is found by offset.
#[derive(Clone, Debug, Default)]
pub(crate) struct Items {
    pub(crate) records: Vec<ItemRecord>,
    /// Each item's SKU, name, image and description, item after item.
    pub(crate) text: String,
    /// Each item's tag indexes then accessory indexes, item after item.
    pub(crate) refs: Vec<u32>,
}

/// The fixed fields of one item; its text and references are spans of [`Items`].
#[derive(Clone, Debug)]
pub(crate) struct ItemRecord {
    pub(crate) id: ItemId,
    /// Where the item's text starts in [`Items::text`], and its length.
    pub(crate) text_at: u32,
    pub(crate) text_len: u32,
    /// Where the SKU, the name and the image end in the item's text (the description runs to
    /// the end). Checked to be ascending char boundaries when an image is loaded.
    pub(crate) ends: [u32; 3],
    /// Bit 0: the item has an image; bit 1: a description (an empty one is still one).
    pub(crate) has: u8,
    /// Dense category index.
    pub(crate) category: u16,
    pub(crate) price: f64,
    pub(crate) popularity: f32,
    pub(crate) in_stock: bool,
    /// Where the item's references start in [`Items::refs`], and how many: tag indexes into
    /// [`Catalog::tags`] (sorted, distinct), then the dense item indexes of accessories (as
    /// declared, deduplicated).
    pub(crate) refs_at: u32,
    pub(crate) refs_len: u32,
    /// How many of the references are tags.
    pub(crate) n_tags: u8,
}

const HAS_IMAGE: u8 = 1;
const HAS_DESCRIPTION: u8 = 2;

impl Items {
    pub(crate) fn with_capacity(items: usize) -> Items {
        Items {
            records: Vec::with_capacity(items),
            text: String::new(),
            refs: Vec::new(),
        }
    }

    /// Adds an item from its fields (`tags` and `accessories` already resolved to indexes).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn push(
        &mut self,
        sku: &str,
        name: &str,
        image: Option<&str>,
        description: Option<&str>,
        category: u16,
        price: f64,
        popularity: f32,
        in_stock: bool,
        tags: &[u32],
        accessories: &[u32],
    ) {
        let text_at = self.text.len();
        let mut ends = [0u32; 3];
        for (end, part) in ends.iter_mut().zip([sku, name, image.unwrap_or("")]) {
            self.text.push_str(part);
            *end = offset(self.text.len() - text_at);
        }
        self.text.push_str(description.unwrap_or(""));
        let refs_at = self.refs.len();
        self.refs.extend_from_slice(tags);
        self.refs.extend_from_slice(accessories);
        self.records.push(ItemRecord {
            id: ItemId::of_sku(sku),
            text_at: offset(text_at),
            text_len: offset(self.text.len() - text_at),
            ends,
            has: u8::from(image.is_some()) * HAS_IMAGE
                + u8::from(description.is_some()) * HAS_DESCRIPTION,
            category,
            price,
            popularity,
            in_stock,
            refs_at: offset(refs_at),
            refs_len: offset(self.refs.len() - refs_at),
            // at most MAX_TAGS_PER_ITEM (16), checked by the compiler
            n_tags: u8::try_from(tags.len()).unwrap_or(u8::MAX),
        });
    }

    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The item at a dense index.
    pub(crate) fn get(&self, index: usize) -> Option<Item<'_>> {
        self.records.get(index).map(|r| self.item(r))
    }

    /// Every item, in dense index order.
    pub(crate) fn iter(&self) -> impl ExactSizeIterator<Item = Item<'_>> + '_ {
        self.records.iter().map(|r| self.item(r))
    }

    /// The item of one record. A span out of range (a corrupt image, before it is checked)
    /// reads as empty.
    fn item<'a>(&'a self, rec: &'a ItemRecord) -> Item<'a> {
        let text_at = rec.text_at as usize;
        let refs_at = rec.refs_at as usize;
        Item {
            rec,
            text: self
                .text
                .get(text_at..text_at + rec.text_len as usize)
                .unwrap_or(""),
            refs: self
                .refs
                .get(refs_at..refs_at + rec.refs_len as usize)
                .unwrap_or(&[]),
        }
    }
}

/// An offset into the catalog's text or references. The catalog's limits (100k items, 64
/// references and a few KB of text each) keep every one far below `u32::MAX`.
fn offset(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// One item of a compiled catalog: a view of its record, text and references.
#[derive(Clone, Copy, Debug)]
pub struct Item<'a> {
    pub(crate) rec: &'a ItemRecord,
    /// SKU, name, image and description, one after the other.
    text: &'a str,
    refs: &'a [u32],
}

impl<'a> Item<'a> {
    /// Part `i` of the text: 0 SKU, 1 name, 2 image, 3 description.
    fn part(self, i: usize) -> &'a str {
        let start = match i {
            0 => 0,
            _ => self.rec.ends.get(i - 1).map_or(0, |e| *e as usize),
        };
        let end = self
            .rec
            .ends
            .get(i)
            .map_or(self.text.len(), |e| *e as usize);
        self.text.get(start..end).unwrap_or("")
    }

    /// Whether `ends` agree with the item's text: ascending, within it, on char boundaries
    /// (what a loaded image must hold for the parts to be what was stored). The text's own
    /// span is in range by construction: the image decoder appends it and records where.
    pub(crate) fn text_is_consistent(self) -> bool {
        let mut previous = 0usize;
        self.rec.ends.iter().all(|e| {
            let e = *e as usize;
            let ok = e >= previous && e <= self.text.len() && self.text.is_char_boundary(e);
            previous = e;
            ok
        })
    }

    /// All references: tags, then accessories.
    pub(crate) fn refs(self) -> &'a [u32] {
        self.refs
    }

    /// The tag indexes, sorted.
    pub(crate) fn tag_indexes(self) -> &'a [u32] {
        self.refs.get(..usize::from(self.rec.n_tags)).unwrap_or(&[])
    }

    /// The accessories' dense item indexes, as declared.
    pub(crate) fn accessory_indexes(self) -> &'a [u32] {
        self.refs.get(usize::from(self.rec.n_tags)..).unwrap_or(&[])
    }

    /// The compact id profiles use: `ItemId::of_sku(sku)`.
    pub fn id(self) -> ItemId {
        self.rec.id
    }
    pub fn sku(self) -> &'a str {
        // the hottest part (popularity ties, lookups by SKU): no general `part` here
        self.text
            .get(..self.rec.ends[0] as usize)
            .unwrap_or_default()
    }
    pub fn name(self) -> &'a str {
        self.part(1)
    }
    /// Price in currency units.
    pub fn price(self) -> f64 {
        self.rec.price
    }
    /// Price in cents, rounded.
    pub fn price_cents(self) -> u64 {
        // Validated finite and within 0..=MAX_PRICE, so the cast is exact enough and in range.
        (self.rec.price * 100.0).round() as u64
    }
    /// Popularity in 0..=1.
    pub fn popularity(self) -> f32 {
        self.rec.popularity
    }
    pub fn in_stock(self) -> bool {
        self.rec.in_stock
    }
    pub fn image(self) -> Option<&'a str> {
        (self.rec.has & HAS_IMAGE != 0).then(|| self.part(2))
    }
    pub fn description(self) -> Option<&'a str> {
        (self.rec.has & HAS_DESCRIPTION != 0).then(|| self.part(3))
    }
    /// Dense index of the item's category; see [`Catalog::category_at`].
    pub fn category_index(self) -> usize {
        usize::from(self.rec.category)
    }
}

/// An item as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ItemView<'a> {
    pub sku: &'a str,
    pub name: &'a str,
    /// The category id (slug).
    pub category: &'a str,
    pub price: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<&'a str>,
}

/// A validated, indexed catalog. Build it with [`Catalog::from_toml`].
#[derive(Clone, Debug)]
pub struct Catalog {
    pub(crate) version: u32,
    pub(crate) categories: Vec<Category>,
    pub(crate) items: Items,
    /// Open-addressing table from [`ItemId`] to dense index (`EMPTY` = free slot), at most
    /// half full. Ids are already hashes, so one multiply spreads them; lookups are one or two
    /// probes instead of a 14-step binary search over 10k ids (profiles are resolved to items
    /// a few dozen times per request).
    pub(crate) item_table: Vec<u32>,
    /// `(id, dense index)` sorted by id.
    pub(crate) category_index: Vec<(CategoryId, u16)>,
    /// All item indexes, most popular first (ties by SKU).
    pub(crate) popular: Vec<u32>,
    /// Distinct tags, sorted.
    pub(crate) tags: Vec<String>,
    /// Per tag (same order as `tags`), item indexes most popular first.
    pub(crate) items_by_tag: Vec<Box<[u32]>>,
    pub(crate) fingerprint: u64,
    /// Per item (same order as `items`), the fields the recommender reads for every candidate,
    /// packed so that ten thousand of them stay in cache.
    pub(crate) hot: Vec<Hot>,
    /// `(sku, earlier sku)` pairs whose [`ItemId`]s collide; see [`Catalog::id_collisions`].
    pub(crate) id_collisions: Vec<(String, String)>,
    /// All items' tag indexes, concatenated; [`Hot::tags_at`] and [`Hot::n_tags`] slice it.
    pub(crate) item_tags: Vec<u32>,
}

/// The per-candidate fields of an item, 16 bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Hot {
    pub(crate) popularity: f32,
    pub(crate) id: ItemId,
    pub(crate) tags_at: u32,
    pub(crate) category: u16,
    pub(crate) n_tags: u8,
    pub(crate) in_stock: bool,
}

impl Catalog {
    /// Parses, validates and indexes a catalog.
    #[cfg(feature = "toml")]
    pub fn from_toml(text: &str) -> Result<Catalog, CatalogError> {
        let raw: RawCatalog = toml::from_str(text).map_err(|e| {
            let (line, column, message) = toml_position(text, &e);
            CatalogError::Toml {
                line,
                column,
                message,
            }
        })?;
        compile(raw)
    }

    /// Parses, validates and indexes a catalog in its JSON form (what the edge receives).
    pub fn from_json(text: &str) -> Result<Catalog, CatalogError> {
        let raw: RawCatalog =
            serde_json::from_str(text).map_err(|e| CatalogError::Json(e.to_string()))?;
        compile(raw)
    }

    /// The demo store's catalog.
    pub fn demo() -> Result<Catalog, CatalogError> {
        Catalog::from_json(DEMO_CATALOG_JSON)
    }

    /// The `version` the document declared.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// A hash of everything dense indexes depend on (categories, SKUs, tags, in order).
    /// Compiled rules remember it so they are never applied to another catalog.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Items in declaration order (their dense index order).
    pub fn items(&self) -> impl ExactSizeIterator<Item = Item<'_>> + '_ {
        self.items.iter()
    }

    /// Categories in declaration order (their dense index order).
    pub fn categories(&self) -> &[Category] {
        &self.categories
    }

    /// Distinct tags used by items, sorted.
    pub fn tags(&self) -> &[String] {
        &self.tags
    }

    /// The item with this id.
    pub fn item(&self, id: ItemId) -> Option<Item<'_>> {
        self.index_of(id).and_then(|i| self.items.get(i))
    }

    /// The item with this SKU.
    pub fn item_by_sku(&self, sku: &str) -> Option<Item<'_>> {
        match self.item(ItemId::of_sku(sku)) {
            Some(it) if it.sku() == sku => Some(it),
            // The SKU's id collides with an earlier item's (rare): find it the slow way.
            Some(_) => self.items.iter().find(|it| it.sku() == sku),
            None => None,
        }
    }

    /// Items whose [`ItemId`] equals that of an earlier item, as `(sku, earlier sku)`.
    ///
    /// Ids are 32-bit hashes so that profiles stay small; a catalog with collisions still
    /// compiles, but profiles cannot tell such items apart (lookups by id give the earlier
    /// one). Worth logging when a catalog is published.
    pub fn id_collisions(&self) -> &[(String, String)] {
        &self.id_collisions
    }

    /// Dense index of the item with this id.
    pub fn index_of(&self, id: ItemId) -> Option<usize> {
        let mask = self.item_table.len().checked_sub(1)?;
        let mut slot = table_slot(id, mask);
        // At most half full, so an empty slot always ends the probe; the bound is a backstop.
        for _ in 0..self.item_table.len() {
            let i = *self.item_table.get(slot)?;
            if i == EMPTY {
                return None;
            }
            if self.hot.get(i as usize).is_some_and(|h| h.id == id) {
                return Some(i as usize);
            }
            slot = (slot + 1) & mask;
        }
        None
    }

    /// The item at a dense index.
    pub fn item_at(&self, index: usize) -> Option<Item<'_>> {
        self.items.get(index)
    }

    /// The category with this id.
    pub fn category(&self, id: CategoryId) -> Option<&Category> {
        self.category_dense(id)
            .and_then(|i| self.categories.get(usize::from(i)))
    }

    /// The category with this slug (`"cameras"`).
    pub fn category_by_slug(&self, slug: &str) -> Option<&Category> {
        self.category(CategoryId::of_name(slug))
            .filter(|c| c.slug == slug)
    }

    /// The category at a dense index.
    pub fn category_at(&self, index: usize) -> Option<&Category> {
        self.categories.get(index)
    }

    /// The category an item belongs to.
    pub fn category_of(&self, item: Item<'_>) -> Option<&Category> {
        self.categories.get(usize::from(item.rec.category))
    }

    /// The compact category id of the item with this id (what the fold needs to credit interest).
    pub fn category_id_of(&self, id: ItemId) -> Option<CategoryId> {
        self.item(id)
            .and_then(|it| self.category_of(it))
            .map(|c| c.id)
    }

    /// Items of a category, most popular first.
    pub fn items_in<'a>(&'a self, category: &'a Category) -> impl Iterator<Item = Item<'a>> + 'a {
        category
            .items
            .iter()
            .filter_map(|i| self.items.get(*i as usize))
    }

    /// Accessory categories of a category, as declared.
    pub fn accessory_categories_of<'a>(
        &'a self,
        category: &'a Category,
    ) -> impl Iterator<Item = &'a Category> + 'a {
        category
            .accessory_categories
            .iter()
            .filter_map(|c| self.categories.get(usize::from(*c)))
    }

    /// Accessories of an item, as declared.
    pub fn accessories_of<'a>(&'a self, item: Item<'a>) -> impl Iterator<Item = Item<'a>> + 'a {
        item.accessory_indexes()
            .iter()
            .filter_map(|i| self.items.get(*i as usize))
    }

    /// Tags of an item, sorted.
    pub fn tags_of<'a>(&'a self, item: Item<'a>) -> impl Iterator<Item = &'a str> + 'a {
        item.tag_indexes()
            .iter()
            .filter_map(|t| self.tags.get(*t as usize))
            .map(String::as_str)
    }

    /// All items, most popular first (ties by SKU).
    pub fn popular(&self) -> impl Iterator<Item = Item<'_>> + '_ {
        self.popular
            .iter()
            .filter_map(|i| self.items.get(*i as usize))
    }

    /// The API view of an item.
    pub fn view<'a>(&'a self, item: Item<'a>) -> ItemView<'a> {
        ItemView {
            sku: item.sku(),
            name: item.name(),
            category: self.category_of(item).map_or("", |c| c.slug.as_str()),
            price: item.price(),
            image: item.image(),
        }
    }

    pub(crate) fn category_dense(&self, id: CategoryId) -> Option<u16> {
        self.category_index
            .binary_search_by_key(&id, |(k, _)| *k)
            .ok()
            .and_then(|p| self.category_index.get(p))
            .map(|(_, i)| *i)
    }

    pub(crate) fn category_index_by_slug(&self, slug: &str) -> Option<u16> {
        self.category_dense(CategoryId::of_name(slug)).filter(|i| {
            self.categories
                .get(usize::from(*i))
                .is_some_and(|c| c.slug == slug)
        })
    }

    pub(crate) fn item_index_by_sku(&self, sku: &str) -> Option<u32> {
        self.index_of(ItemId::of_sku(sku))
            .filter(|i| self.items.get(*i).is_some_and(|it| it.sku() == sku))
            .map(|i| i as u32)
    }

    /// Tag indexes of an item, from the packed array.
    pub(crate) fn hot_tags(&self, h: &Hot) -> &[u32] {
        let start = h.tags_at as usize;
        self.item_tags
            .get(start..start + usize::from(h.n_tags))
            .unwrap_or(&[])
    }

    pub(crate) fn tag_index(&self, tag: &str) -> Option<u32> {
        self.tags
            .binary_search_by(|t| t.as_str().cmp(tag))
            .ok()
            .map(|i| i as u32)
    }
}

const EMPTY: u32 = u32::MAX;

/// Home slot of an id in a power-of-two table (Fibonacci hashing of the 32-bit id).
fn table_slot(id: ItemId, mask: usize) -> usize {
    (u64::from(id.0).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize & mask
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Fixtures the catalog's tests share (the rules' tests too: [`mutate`]), and tests of the
/// compiled catalog's lookups.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const HEAD: &str = r#"
version = 1
[[category]]
id = "cameras"
name = "Cameras"
accessory_categories = ["lenses"]
[[category]]
id = "lenses"
name = "Lenses"
"#;

    pub(crate) fn parse(body: &str) -> Result<Catalog, CatalogError> {
        Catalog::from_toml(&format!("{HEAD}{body}"))
    }

    /// Compiles `body` after the two-category header and checks the exact error message.
    #[track_caller]
    pub(crate) fn check(body: &str, expected: &str) {
        match parse(body) {
            Ok(_) => panic!("catalog accepted, expected error: {expected}\n{body}"),
            Err(e) => assert_eq!(e.to_string(), expected, "for catalog:\n{body}"),
        }
    }

    /// Like [`check`] but for a whole document.
    #[track_caller]
    pub(crate) fn check_doc(doc: &str, expected: &str) {
        match Catalog::from_toml(doc) {
            Ok(_) => panic!("catalog accepted, expected error: {expected}\n{doc}"),
            Err(e) => assert_eq!(e.to_string(), expected, "for catalog:\n{doc}"),
        }
    }

    pub(crate) const CAM: &str = r#"
[[item]]
sku = "cam-001"
name = "Lumix Z5 Mirrorless Camera"
category = "cameras"
price = 499.00
tags = ["mirrorless", "4k"]
popularity = 0.93
accessories = ["lens-014"]
image = "https://img.example/cam-001.jpg"
[[item]]
sku = "lens-014"
name = "25mm f/1.7 Lens"
category = "lenses"
price = 199
popularity = 0.5
"#;

    /// Edits of a valid document at random places, with the kinds of tokens that break
    /// things (quotes, brackets, huge and negative numbers, duplicates, non-ASCII).
    pub(crate) fn mutate(text: &str, at: usize, cut: usize, insert: &str) -> String {
        let mut at = at % (text.len() + 1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let mut end = (at + cut).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        format!("{}{}{}", &text[..at], insert, &text[end..])
    }
    #[test]
    fn the_json_form_is_the_same_document() {
        use crate::rules::{CompiledRules, DEMO_RULES, DEMO_RULES_JSON};
        let from_toml = Catalog::from_toml(DEMO_CATALOG).unwrap();
        let json = toml_to_json(DEMO_CATALOG).unwrap();
        let from_json = Catalog::from_json(&json).unwrap();
        assert_eq!(from_json.fingerprint(), from_toml.fingerprint());
        assert_eq!(
            Catalog::demo().unwrap().fingerprint(),
            from_toml.fingerprint()
        );
        let rules = CompiledRules::compile(DEMO_RULES, &from_toml).unwrap();
        let rules_json = CompiledRules::compile_json(DEMO_RULES_JSON, &from_json).unwrap();
        assert_eq!(format!("{rules:?}"), format!("{rules_json:?}"));
        assert!(matches!(
            Catalog::from_json("{\"version\": 1, \"item\": 3}"),
            Err(CatalogError::Json(_))
        ));
        assert!(matches!(
            CompiledRules::compile_json("[", &from_json),
            Err(crate::rules::RulesError::Json(_))
        ));
    }
    #[test]
    fn compiles_a_small_catalog() {
        let c = parse(CAM).expect("valid");
        assert_eq!(c.version(), 1);
        assert_eq!(c.len(), 2);
        let cam = c.item_by_sku("cam-001").expect("cam");
        assert_eq!(cam.id(), ItemId::of_sku("cam-001"));
        assert_eq!(cam.name(), "Lumix Z5 Mirrorless Camera");
        assert_eq!(cam.price(), 499.0);
        assert_eq!(cam.price_cents(), 49_900);
        assert!(cam.in_stock());
        assert_eq!(c.category_of(cam).map(Category::slug), Some("cameras"));
        assert_eq!(c.tags_of(cam).collect::<Vec<_>>(), ["4k", "mirrorless"]);
        assert_eq!(
            c.accessories_of(cam).map(Item::sku).collect::<Vec<_>>(),
            ["lens-014"]
        );
        let lens = c.item(ItemId::of_sku("lens-014")).expect("lens");
        assert_eq!(lens.price(), 199.0, "integer prices are accepted");
        assert_eq!(lens.popularity(), 0.5);
        assert_eq!(lens.image(), None);
        assert!(c.item_by_sku("nope").is_none());
        assert_eq!(
            c.category_id_of(ItemId::of_sku("cam-001")),
            Some(CategoryId::of_name("cameras"))
        );
        let cams = c.category_by_slug("cameras").expect("cameras");
        assert_eq!(cams.name(), "Cameras");
        assert_eq!(
            c.accessory_categories_of(cams)
                .map(Category::slug)
                .collect::<Vec<_>>(),
            ["lenses"]
        );
        assert_eq!(
            c.popular().map(Item::sku).collect::<Vec<_>>(),
            ["cam-001", "lens-014"]
        );
        let json = serde_json::to_string(&c.view(cam)).expect("json");
        assert_eq!(
            json,
            r#"{"sku":"cam-001","name":"Lumix Z5 Mirrorless Camera","category":"cameras","price":499.0,"image":"https://img.example/cam-001.jpg"}"#
        );
        let json = serde_json::to_string(&c.view(lens)).expect("json");
        assert!(!json.contains("image"), "{json}");
    }
    #[test]
    fn demo_catalog_compiles() {
        let c = Catalog::demo().expect("demo catalog compiles");
        assert!(c.len() >= 250, "demo has {} items", c.len());
        assert!(c.categories().len() >= 12);
        let cam = c.item_by_sku("cam-001").expect("cam-001 exists");
        assert_eq!(c.category_of(cam).map(Category::slug), Some("cameras"));
        let cams = c.category_by_slug("cameras").expect("cameras");
        let acc: Vec<&str> = c
            .accessory_categories_of(cams)
            .map(Category::slug)
            .collect();
        for want in ["lenses", "memory-cards", "tripods", "camera-bags"] {
            assert!(
                acc.contains(&want),
                "cameras lack accessory category {want}"
            );
        }
        assert!(c.accessories_of(cam).count() >= 3);
        assert!(
            c.items().any(|i| !i.in_stock()),
            "demo shows an out-of-stock item"
        );
    }
}
