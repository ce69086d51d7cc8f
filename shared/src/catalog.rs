//! The product catalog: a declarative, versioned TOML document compiled once into indexes.
//!
//! Why it is shaped this way:
//!
//! * **TOML, validated up front.** Merchandisers edit the catalog by hand, so every mistake is
//!   reported at load time with the item or category, the field, and what to do about it
//!   (`item "cam-001": field "category": unknown category "camras"; declare it under
//!   [[category]]`). The recommender then works on a catalog that is known to be consistent and
//!   never has to handle a dangling reference.
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

use crate::ids::{CategoryId, ItemId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

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
pub const DEMO_CATALOG: &str = include_str!("../data/catalog.toml");
/// [`DEMO_CATALOG`] in its JSON form (generated from it at build time).
pub const DEMO_CATALOG_JSON: &str = include_str!(concat!(env!("OUT_DIR"), "/catalog.json"));

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// What a validation error is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// A `[[category]]`, by its `id` as written.
    Category(String),
    /// An `[[item]]`, by its `sku` as written.
    Item(String),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Category(id) => write!(f, "category {id:?}"),
            Subject::Item(sku) => write!(f, "item {sku:?}"),
        }
    }
}

/// What is wrong with one field.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Problem {
    /// Not a valid category id or tag.
    BadSlug,
    /// Not a valid SKU.
    BadSku,
    /// An empty (or blank) string.
    Empty,
    /// A string longer than allowed.
    TooLong { len: usize, max: usize },
    /// A second category with the same id, or a second item with the same SKU.
    Duplicate,
    /// Refers to a category that is not declared.
    UnknownCategory(String),
    /// Refers to a SKU that is not in the catalog.
    UnknownSku(String),
    /// An item lists itself as its accessory.
    SelfAccessory,
    /// A category lists itself as its accessory category.
    SelfAccessoryCategory,
    /// A number outside its range; `range` says which values are accepted.
    OutOfRange { value: f64, range: &'static str },
    /// The id hash equals that of another, differently named, entry.
    HashCollision { id: String, other: Subject },
    /// A list with more entries than allowed.
    TooMany { count: usize, max: usize },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::BadSlug => write!(
                f,
                "use 1 to {MAX_SLUG_LEN} characters from a-z, 0-9, \"_\" and \"-\""
            ),
            Problem::BadSku => write!(
                f,
                "use 1 to {MAX_SKU_LEN} characters from A-Z, a-z, 0-9, \".\", \"_\", \":\" and \"-\""
            ),
            Problem::Empty => write!(f, "must not be empty"),
            Problem::TooLong { len, max } => {
                write!(f, "is {len} characters long; shorten it to at most {max}")
            }
            Problem::Duplicate => write!(f, "declared more than once; each must be unique"),
            Problem::UnknownCategory(c) => {
                write!(f, "unknown category {c:?}; declare it under [[category]]")
            }
            Problem::UnknownSku(s) => write!(
                f,
                "unknown sku {s:?}; list only skus of items in this catalog"
            ),
            Problem::SelfAccessory => {
                write!(f, "an item cannot be its own accessory; remove its own sku")
            }
            Problem::SelfAccessoryCategory => write!(
                f,
                "a category cannot be its own accessory category; remove its own id"
            ),
            Problem::OutOfRange { value, range } => {
                write!(f, "{value} is out of range; use {range}")
            }
            Problem::HashCollision { id, other } => write!(
                f,
                "its id {id} collides with that of {other}; rename one of them"
            ),
            Problem::TooMany { count, max } => {
                write!(f, "lists {count} entries; at most {max} are allowed")
            }
        }
    }
}

/// Why a catalog was rejected. Messages are lowercase and say what to fix.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// Not TOML, or not the catalog's shape (unknown or missing field, wrong type).
    #[error("catalog toml, line {line}, column {column}: {message}")]
    Toml {
        line: usize,
        column: usize,
        message: String,
    },
    /// Not JSON, or not the catalog's shape (the published form; see [`toml_to_json`]).
    #[error("catalog json: {0}")]
    Json(String),
    #[error(
        "field \"version\": unsupported catalog version {found}; this build reads version {CATALOG_VERSION}"
    )]
    UnsupportedVersion { found: i64 },
    #[error("too many categories: {count}; a catalog holds at most {max}")]
    TooManyCategories { count: usize, max: usize },
    #[error("too many items: {count}; a catalog holds at most {max}")]
    TooManyItems { count: usize, max: usize },
    /// One field of one category or item is invalid.
    #[error("{subject}: field \"{field}\": {problem}")]
    Invalid {
        subject: Subject,
        field: &'static str,
        problem: Problem,
    },
}

/// Converts a TOML document (catalog or rules) to the JSON form that is published to the edge.
/// Validate it first ([`Catalog::from_toml`], `CompiledRules::compile`); this only re-encodes.
#[cfg(feature = "toml")]
pub fn toml_to_json(text: &str) -> Result<String, String> {
    let value: toml::Value = toml::from_str(text).map_err(|e| e.message().to_owned())?;
    serde_json::to_string(&value).map_err(|e| e.to_string())
}

/// Turns a TOML error into a line, a column and a one-line message (shared with the rules).
#[cfg(feature = "toml")]
pub(crate) fn toml_position(text: &str, err: &toml::de::Error) -> (usize, usize, String) {
    let (line, column) = match err.span() {
        Some(span) => line_col(text, span.start),
        None => (1, 1),
    };
    let message = err
        .message()
        .trim()
        .trim_end_matches('.')
        .replace('\n', "; ");
    (line, column, message)
}

#[cfg(feature = "toml")]
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let bytes = text.as_bytes();
    let before = bytes.get(..offset).unwrap_or(bytes);
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |p| p + 1);
    (line, before.len() - line_start + 1)
}

// ---------------------------------------------------------------------------------------------
// TOML shape
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    version: i64,
    #[serde(default)]
    category: Vec<RawCategory>,
    #[serde(default)]
    item: Vec<RawItem>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCategory {
    id: String,
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    accessory_categories: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawItem {
    sku: String,
    name: String,
    category: String,
    price: f64,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    popularity: f64,
    #[serde(default = "default_true")]
    in_stock: bool,
    #[serde(default)]
    accessories: Vec<String>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

fn default_true() -> bool {
    true
}

// ---------------------------------------------------------------------------------------------
// Compiled form
// ---------------------------------------------------------------------------------------------

/// One category of a compiled catalog.
#[derive(Clone, Debug)]
pub struct Category {
    pub(crate) slug: String,
    pub(crate) name: String,
    pub(crate) id: CategoryId,
    pub(crate) description: Option<String>,
    /// Dense indexes of accessory categories, as declared (deduplicated).
    pub(crate) accessory_categories: Box<[u16]>,
    /// Dense item indexes, most popular first (ties by SKU).
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

/// One item of a compiled catalog.
#[derive(Clone, Debug)]
pub struct Item {
    pub(crate) id: ItemId,
    pub(crate) sku: String,
    pub(crate) name: String,
    /// Dense category index.
    pub(crate) category: u16,
    pub(crate) price: f64,
    pub(crate) popularity: f32,
    pub(crate) in_stock: bool,
    /// Tag indexes into [`Catalog::tags`], sorted, distinct.
    pub(crate) tags: Box<[u32]>,
    /// Dense item indexes of accessories, as declared (deduplicated).
    pub(crate) accessories: Box<[u32]>,
    pub(crate) image: Option<String>,
    pub(crate) description: Option<String>,
}

impl Item {
    /// The compact id profiles use: `ItemId::of_sku(sku)`.
    pub fn id(&self) -> ItemId {
        self.id
    }
    pub fn sku(&self) -> &str {
        &self.sku
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Price in currency units.
    pub fn price(&self) -> f64 {
        self.price
    }
    /// Price in cents, rounded.
    pub fn price_cents(&self) -> u64 {
        // Validated finite and within 0..=MAX_PRICE, so the cast is exact enough and in range.
        (self.price * 100.0).round() as u64
    }
    /// Popularity in 0..=1.
    pub fn popularity(&self) -> f32 {
        self.popularity
    }
    pub fn in_stock(&self) -> bool {
        self.in_stock
    }
    pub fn image(&self) -> Option<&str> {
        self.image.as_deref()
    }
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }
    /// Dense index of the item's category; see [`Catalog::category_at`].
    pub fn category_index(&self) -> usize {
        usize::from(self.category)
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
    pub(crate) items: Vec<Item>,
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
    pub fn items(&self) -> impl ExactSizeIterator<Item = &Item> + '_ {
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
    pub fn item(&self, id: ItemId) -> Option<&Item> {
        self.index_of(id).and_then(|i| self.items.get(i))
    }

    /// The item with this SKU.
    pub fn item_by_sku(&self, sku: &str) -> Option<&Item> {
        match self.item(ItemId::of_sku(sku)) {
            Some(it) if it.sku == sku => Some(it),
            // The SKU's id collides with an earlier item's (rare): find it the slow way.
            Some(_) => self.items.iter().find(|it| it.sku == sku),
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
    pub fn item_at(&self, index: usize) -> Option<&Item> {
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
    pub fn category_of(&self, item: &Item) -> Option<&Category> {
        self.categories.get(usize::from(item.category))
    }

    /// The compact category id of the item with this id (what the fold needs to credit interest).
    pub fn category_id_of(&self, id: ItemId) -> Option<CategoryId> {
        self.item(id)
            .and_then(|it| self.category_of(it))
            .map(|c| c.id)
    }

    /// Items of a category, most popular first.
    pub fn items_in<'a>(&'a self, category: &'a Category) -> impl Iterator<Item = &'a Item> + 'a {
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
    pub fn accessories_of<'a>(&'a self, item: &'a Item) -> impl Iterator<Item = &'a Item> + 'a {
        item.accessories
            .iter()
            .filter_map(|i| self.items.get(*i as usize))
    }

    /// Tags of an item, sorted.
    pub fn tags_of<'a>(&'a self, item: &'a Item) -> impl Iterator<Item = &'a str> + 'a {
        item.tags
            .iter()
            .filter_map(|t| self.tags.get(*t as usize))
            .map(String::as_str)
    }

    /// All items, most popular first (ties by SKU).
    pub fn popular(&self) -> impl Iterator<Item = &Item> + '_ {
        self.popular
            .iter()
            .filter_map(|i| self.items.get(*i as usize))
    }

    /// The API view of an item.
    pub fn view<'a>(&'a self, item: &'a Item) -> ItemView<'a> {
        ItemView {
            sku: &item.sku,
            name: &item.name,
            category: self.category_of(item).map_or("", |c| c.slug.as_str()),
            price: item.price,
            image: item.image.as_deref(),
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
            .filter(|i| self.items.get(*i).is_some_and(|it| it.sku == sku))
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

// ---------------------------------------------------------------------------------------------
// Compiler
// ---------------------------------------------------------------------------------------------

fn invalid(subject: Subject, field: &'static str, problem: Problem) -> CatalogError {
    CatalogError::Invalid {
        subject,
        field,
        problem,
    }
}

fn check_text(
    subject: &Subject,
    field: &'static str,
    value: &str,
    max: usize,
    allow_empty: bool,
) -> Result<(), CatalogError> {
    if !allow_empty && value.trim().is_empty() {
        return Err(invalid(subject.clone(), field, Problem::Empty));
    }
    let len = value.chars().count();
    if len > max {
        return Err(invalid(
            subject.clone(),
            field,
            Problem::TooLong { len, max },
        ));
    }
    Ok(())
}

const EMPTY: u32 = u32::MAX;

/// Home slot of an id in a power-of-two table (Fibonacci hashing of the 32-bit id).
fn table_slot(id: ItemId, mask: usize) -> usize {
    (u64::from(id.0).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize & mask
}

/// FNV-1a, 64 bits, fed piecewise.
pub(crate) struct Fnv64(u64);

impl Fnv64 {
    pub(crate) fn new() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator so that ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

fn compile(raw: RawCatalog) -> Result<Catalog, CatalogError> {
    if raw.version != CATALOG_VERSION {
        return Err(CatalogError::UnsupportedVersion { found: raw.version });
    }
    let version = u32::try_from(raw.version).unwrap_or(0);
    if raw.category.len() > MAX_CATEGORIES {
        return Err(CatalogError::TooManyCategories {
            count: raw.category.len(),
            max: MAX_CATEGORIES,
        });
    }
    if raw.item.len() > MAX_ITEMS {
        return Err(CatalogError::TooManyItems {
            count: raw.item.len(),
            max: MAX_ITEMS,
        });
    }

    // Categories: ids, names, uniqueness, hash collisions.
    let mut cat_by_slug: BTreeMap<&str, u16> = BTreeMap::new();
    let mut cat_by_hash: BTreeMap<CategoryId, &str> = BTreeMap::new();
    for (i, c) in raw.category.iter().enumerate() {
        let subject = Subject::Category(c.id.clone());
        if !is_slug(&c.id) {
            return Err(invalid(subject, "id", Problem::BadSlug));
        }
        if cat_by_slug.contains_key(c.id.as_str()) {
            return Err(invalid(subject, "id", Problem::Duplicate));
        }
        let cid = CategoryId::of_name(&c.id);
        if let Some(other) = cat_by_hash.get(&cid) {
            return Err(invalid(
                subject,
                "id",
                Problem::HashCollision {
                    id: format!("{cid:?}"),
                    other: Subject::Category((*other).to_string()),
                },
            ));
        }
        check_text(&subject, "name", &c.name, MAX_NAME_LEN, false)?;
        if let Some(d) = &c.description {
            check_text(&subject, "description", d, MAX_DESCRIPTION_LEN, true)?;
        }
        // i < MAX_CATEGORIES <= u16::MAX, checked above.
        cat_by_slug.insert(&c.id, u16::try_from(i).unwrap_or(u16::MAX));
        cat_by_hash.insert(cid, &c.id);
    }

    // Accessory categories need every category declared first.
    let mut categories: Vec<Category> = Vec::with_capacity(raw.category.len());
    for (i, c) in raw.category.iter().enumerate() {
        let subject = || Subject::Category(c.id.clone());
        if c.accessory_categories.len() > MAX_ACCESSORY_CATEGORIES {
            return Err(invalid(
                subject(),
                "accessory_categories",
                Problem::TooMany {
                    count: c.accessory_categories.len(),
                    max: MAX_ACCESSORY_CATEGORIES,
                },
            ));
        }
        let mut acc: Vec<u16> = Vec::with_capacity(c.accessory_categories.len());
        for a in &c.accessory_categories {
            let Some(&ai) = cat_by_slug.get(a.as_str()) else {
                return Err(invalid(
                    subject(),
                    "accessory_categories",
                    Problem::UnknownCategory(a.clone()),
                ));
            };
            if usize::from(ai) == i {
                return Err(invalid(
                    subject(),
                    "accessory_categories",
                    Problem::SelfAccessoryCategory,
                ));
            }
            if !acc.contains(&ai) {
                acc.push(ai);
            }
        }
        categories.push(Category {
            slug: c.id.clone(),
            name: c.name.clone(),
            id: CategoryId::of_name(&c.id),
            description: c.description.clone(),
            accessory_categories: acc.into_boxed_slice(),
            items: Box::new([]),
        });
    }

    // Items: SKUs, uniqueness, hash collisions, fields.
    let mut sku_to_index: BTreeMap<&str, u32> = BTreeMap::new();
    let mut item_by_hash: BTreeMap<ItemId, &str> = BTreeMap::new();
    let mut id_collisions: Vec<(String, String)> = Vec::new();
    let mut tag_names: BTreeMap<&str, u32> = BTreeMap::new();
    for (i, it) in raw.item.iter().enumerate() {
        let subject = Subject::Item(it.sku.clone());
        if !is_sku(&it.sku) {
            return Err(invalid(subject, "sku", Problem::BadSku));
        }
        if sku_to_index.contains_key(it.sku.as_str()) {
            return Err(invalid(subject, "sku", Problem::Duplicate));
        }
        let id = ItemId::of_sku(&it.sku);
        if let Some(other) = item_by_hash.get(&id) {
            // Tolerated, not rejected: 32-bit ids collide with ~1% odds at 10k items and ~69%
            // at 100k, and refusing a whole catalog for it would be worse than the effect,
            // which is that profiles attribute this item's views, cart lines and purchases to
            // the earlier one. Both stay sellable and recommendable.
            id_collisions.push((it.sku.clone(), (*other).to_string()));
        }
        check_text(&subject, "name", &it.name, MAX_NAME_LEN, false)?;
        if !cat_by_slug.contains_key(it.category.as_str()) {
            return Err(invalid(
                subject,
                "category",
                Problem::UnknownCategory(it.category.clone()),
            ));
        }
        if !(0.0..=MAX_PRICE).contains(&it.price) {
            return Err(invalid(
                subject,
                "price",
                Problem::OutOfRange {
                    value: it.price,
                    range: "a number from 0 to 1000000000",
                },
            ));
        }
        if !(0.0..=1.0).contains(&it.popularity) {
            return Err(invalid(
                subject,
                "popularity",
                Problem::OutOfRange {
                    value: it.popularity,
                    range: "a number from 0 to 1",
                },
            ));
        }
        if it.tags.len() > MAX_TAGS_PER_ITEM {
            return Err(invalid(
                subject,
                "tags",
                Problem::TooMany {
                    count: it.tags.len(),
                    max: MAX_TAGS_PER_ITEM,
                },
            ));
        }
        for t in &it.tags {
            if !is_slug(t) {
                return Err(invalid(subject, "tags", Problem::BadSlug));
            }
            tag_names.insert(t, 0);
        }
        if it.accessories.len() > MAX_ACCESSORIES_PER_ITEM {
            return Err(invalid(
                subject,
                "accessories",
                Problem::TooMany {
                    count: it.accessories.len(),
                    max: MAX_ACCESSORIES_PER_ITEM,
                },
            ));
        }
        if let Some(img) = &it.image {
            check_text(&subject, "image", img, MAX_IMAGE_LEN, false)?;
        }
        if let Some(d) = &it.description {
            check_text(&subject, "description", d, MAX_DESCRIPTION_LEN, true)?;
        }
        // i < MAX_ITEMS < u32::MAX, checked above.
        sku_to_index.insert(&it.sku, u32::try_from(i).unwrap_or(u32::MAX));
        item_by_hash.entry(id).or_insert(&it.sku);
    }

    // Tags get dense indexes in sorted order.
    let tags: Vec<String> = tag_names.keys().map(|t| (*t).to_string()).collect();
    for (n, v) in tag_names.values_mut().enumerate() {
        *v = u32::try_from(n).unwrap_or(u32::MAX);
    }

    // Second pass: resolve accessories and build items.
    let mut items: Vec<Item> = Vec::with_capacity(raw.item.len());
    for (i, it) in raw.item.iter().enumerate() {
        let mut accessories: Vec<u32> = Vec::with_capacity(it.accessories.len());
        for a in &it.accessories {
            let Some(&ai) = sku_to_index.get(a.as_str()) else {
                return Err(invalid(
                    Subject::Item(it.sku.clone()),
                    "accessories",
                    Problem::UnknownSku(a.clone()),
                ));
            };
            if ai as usize == i {
                return Err(invalid(
                    Subject::Item(it.sku.clone()),
                    "accessories",
                    Problem::SelfAccessory,
                ));
            }
            if !accessories.contains(&ai) {
                accessories.push(ai);
            }
        }
        let mut item_tags: Vec<u32> = it
            .tags
            .iter()
            .filter_map(|t| tag_names.get(t.as_str()).copied())
            .collect();
        item_tags.sort_unstable();
        item_tags.dedup();
        items.push(Item {
            id: ItemId::of_sku(&it.sku),
            sku: it.sku.clone(),
            name: it.name.clone(),
            category: cat_by_slug.get(it.category.as_str()).copied().unwrap_or(0),
            price: it.price,
            popularity: it.popularity as f32,
            in_stock: it.in_stock,
            tags: item_tags.into_boxed_slice(),
            accessories: accessories.into_boxed_slice(),
            image: it.image.clone(),
            description: it.description.clone(),
        });
    }

    // Popularity orderings: global, per category, per tag.
    let mut popular: Vec<u32> = (0..items.len()).map(|i| i as u32).collect();
    popular.sort_by(
        |a, b| match (items.get(*a as usize), items.get(*b as usize)) {
            (Some(x), Some(y)) => y
                .popularity
                .total_cmp(&x.popularity)
                .then_with(|| x.sku.cmp(&y.sku)),
            _ => a.cmp(b),
        },
    );
    let mut per_category: Vec<Vec<u32>> = vec![Vec::new(); categories.len()];
    let mut per_tag: Vec<Vec<u32>> = vec![Vec::new(); tags.len()];
    for &i in &popular {
        if let Some(it) = items.get(i as usize) {
            if let Some(v) = per_category.get_mut(usize::from(it.category)) {
                v.push(i);
            }
            for t in it.tags.iter() {
                if let Some(v) = per_tag.get_mut(*t as usize) {
                    v.push(i);
                }
            }
        }
    }
    for (c, v) in categories.iter_mut().zip(per_category) {
        c.items = v.into_boxed_slice();
    }
    let items_by_tag: Vec<Box<[u32]>> = per_tag.into_iter().map(Vec::into_boxed_slice).collect();

    let mut item_tags: Vec<u32> = Vec::new();
    let hot: Vec<Hot> = items
        .iter()
        .map(|it| {
            let tags_at = u32::try_from(item_tags.len()).unwrap_or(u32::MAX);
            item_tags.extend_from_slice(&it.tags);
            Hot {
                popularity: it.popularity,
                id: it.id,
                tags_at,
                category: it.category,
                // At most MAX_TAGS_PER_ITEM (16), checked above.
                n_tags: u8::try_from(it.tags.len()).unwrap_or(u8::MAX),
                in_stock: it.in_stock,
            }
        })
        .collect();

    // Ids are distinct (collisions were rejected), so each lands in its own slot.
    let capacity = (items.len() * 2).max(16).next_power_of_two();
    let mut item_table = vec![EMPTY; capacity];
    let mask = capacity - 1;
    for (i, it) in items.iter().enumerate() {
        let mut slot = table_slot(it.id, mask);
        while item_table.get(slot).is_some_and(|s| *s != EMPTY) {
            slot = (slot + 1) & mask;
        }
        if let Some(s) = item_table.get_mut(slot) {
            *s = i as u32;
        }
    }
    let mut category_index: Vec<(CategoryId, u16)> = categories
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id, u16::try_from(i).unwrap_or(u16::MAX)))
        .collect();
    category_index.sort_unstable();

    let mut h = Fnv64::new();
    h.write(&version.to_le_bytes());
    for c in &categories {
        h.write(c.slug.as_bytes());
    }
    h.write(b"--items--");
    for it in &items {
        h.write(it.sku.as_bytes());
    }
    h.write(b"--tags--");
    for t in &tags {
        h.write(t.as_bytes());
    }

    Ok(Catalog {
        version,
        categories,
        items,
        item_table,
        category_index,
        popular,
        tags,
        items_by_tag,
        fingerprint: h.0,
        hot,
        id_collisions,
        item_tags,
    })
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

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
    use std::collections::BTreeSet;

    const HEAD: &str = r#"
version = 1
[[category]]
id = "cameras"
name = "Cameras"
accessory_categories = ["lenses"]
[[category]]
id = "lenses"
name = "Lenses"
"#;

    fn parse(body: &str) -> Result<Catalog, CatalogError> {
        Catalog::from_toml(&format!("{HEAD}{body}"))
    }

    /// Compiles `body` after the two-category header and checks the exact error message.
    #[track_caller]
    fn check(body: &str, expected: &str) {
        match parse(body) {
            Ok(_) => panic!("catalog accepted, expected error: {expected}\n{body}"),
            Err(e) => assert_eq!(e.to_string(), expected, "for catalog:\n{body}"),
        }
    }

    /// Like [`check`] but for a whole document.
    #[track_caller]
    fn check_doc(doc: &str, expected: &str) {
        match Catalog::from_toml(doc) {
            Ok(_) => panic!("catalog accepted, expected error: {expected}\n{doc}"),
            Err(e) => assert_eq!(e.to_string(), expected, "for catalog:\n{doc}"),
        }
    }

    const CAM: &str = r#"
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
    fn defaults_apply() {
        let c = parse(
            r#"
[[item]]
sku = "x"
name = "X"
category = "lenses"
price = 0
"#,
        )
        .expect("valid");
        let x = c.item_by_sku("x").expect("x");
        assert!(x.in_stock());
        assert_eq!(x.popularity(), 0.0);
        assert_eq!(c.tags_of(x).count(), 0);
        assert_eq!(c.accessories_of(x).count(), 0);
    }

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
    fn field_errors() {
        let item = |extra: &str| {
            format!(
                "[[item]]\nsku = \"cam-001\"\nname = \"Cam\"\ncategory = \"cameras\"\nprice = 1\n{extra}\n"
            )
        };
        let cases: &[(&str, &str)] = &[
            (
                "[[item]]\nsku = \"cam-001\"\nname = \"Cam\"\ncategory = \"camras\"\nprice = 1\n",
                r#"item "cam-001": field "category": unknown category "camras"; declare it under [[category]]"#,
            ),
            (
                "[[item]]\nsku = \"cam 001\"\nname = \"Cam\"\ncategory = \"cameras\"\nprice = 1\n",
                r#"item "cam 001": field "sku": use 1 to 64 characters from A-Z, a-z, 0-9, ".", "_", ":" and "-""#,
            ),
            (
                "[[item]]\nsku = \"\"\nname = \"Cam\"\ncategory = \"cameras\"\nprice = 1\n",
                r#"item "": field "sku": use 1 to 64 characters from A-Z, a-z, 0-9, ".", "_", ":" and "-""#,
            ),
            (
                "[[item]]\nsku = \"cam-001\"\nname = \"  \"\ncategory = \"cameras\"\nprice = 1\n",
                r#"item "cam-001": field "name": must not be empty"#,
            ),
            (
                &item("price = 2\n"),
                "catalog toml, line 15, column 1: duplicate key `price` in table `item`",
            ),
            (
                "[[item]]\nsku = \"cam-001\"\nname = \"Cam\"\ncategory = \"cameras\"\nprice = -1\n",
                r#"item "cam-001": field "price": -1 is out of range; use a number from 0 to 1000000000"#,
            ),
            (
                "[[item]]\nsku = \"cam-001\"\nname = \"Cam\"\ncategory = \"cameras\"\nprice = nan\n",
                r#"item "cam-001": field "price": NaN is out of range; use a number from 0 to 1000000000"#,
            ),
            (
                &item("popularity = 1.5"),
                r#"item "cam-001": field "popularity": 1.5 is out of range; use a number from 0 to 1"#,
            ),
            (
                &item("popularity = -0.1"),
                r#"item "cam-001": field "popularity": -0.1 is out of range; use a number from 0 to 1"#,
            ),
            (
                &item("tags = [\"Bad Tag\"]"),
                r#"item "cam-001": field "tags": use 1 to 48 characters from a-z, 0-9, "_" and "-""#,
            ),
            (
                &item("accessories = [\"lens-999\"]"),
                r#"item "cam-001": field "accessories": unknown sku "lens-999"; list only skus of items in this catalog"#,
            ),
            (
                &item("accessories = [\"cam-001\"]"),
                r#"item "cam-001": field "accessories": an item cannot be its own accessory; remove its own sku"#,
            ),
            (
                &item("image = \"\""),
                r#"item "cam-001": field "image": must not be empty"#,
            ),
            (
                &item("name2 = 1\n"),
                "catalog toml, line 15, column 1: unknown field `name2`, expected one of `sku`, `name`, `category`, `price`, `tags`, `popularity`, `in_stock`, `accessories`, `image`, `description`",
            ),
            (
                "[[item]]\nsku = \"cam-001\"\nname = \"Cam\"\ncategory = \"cameras\"\n",
                "catalog toml, line 10, column 1: missing field `price`",
            ),
            (
                &item("in_stock = \"yes\""),
                "catalog toml, line 15, column 12: invalid type: string \"yes\", expected a boolean",
            ),
        ];
        for (body, expected) in cases {
            check(body, expected);
        }
    }

    #[test]
    fn length_and_count_limits() {
        let long_name = "n".repeat(MAX_NAME_LEN + 1);
        check(
            &format!(
                "[[item]]\nsku = \"a\"\nname = \"{long_name}\"\ncategory = \"cameras\"\nprice = 1\n"
            ),
            r#"item "a": field "name": is 201 characters long; shorten it to at most 200"#,
        );
        let tags: Vec<String> = (0..17).map(|i| format!("\"t{i}\"")).collect();
        check(
            &format!(
                "[[item]]\nsku = \"a\"\nname = \"A\"\ncategory = \"cameras\"\nprice = 1\ntags = [{}]\n",
                tags.join(",")
            ),
            r#"item "a": field "tags": lists 17 entries; at most 16 are allowed"#,
        );
        let long_sku = "s".repeat(MAX_SKU_LEN + 1);
        check(
            &format!(
                "[[item]]\nsku = \"{long_sku}\"\nname = \"A\"\ncategory = \"cameras\"\nprice = 1\n"
            ),
            &format!(
                r#"item "{long_sku}": field "sku": use 1 to 64 characters from A-Z, a-z, 0-9, ".", "_", ":" and "-""#
            ),
        );
        let long_slug = "c".repeat(MAX_SLUG_LEN + 1);
        check_doc(
            &format!("version = 1\n[[category]]\nid = \"{long_slug}\"\nname = \"C\"\n"),
            &format!(
                r#"category "{long_slug}": field "id": use 1 to 48 characters from a-z, 0-9, "_" and "-""#
            ),
        );
        // Exactly at the limit is fine.
        let ok_slug = "c".repeat(MAX_SLUG_LEN);
        assert!(
            Catalog::from_toml(&format!(
                "version = 1\n[[category]]\nid = \"{ok_slug}\"\nname = \"C\"\n"
            ))
            .is_ok()
        );
    }

    #[test]
    fn duplicates() {
        check(
            &format!(
                "{CAM}[[item]]\nsku = \"cam-001\"\nname = \"Again\"\ncategory = \"cameras\"\nprice = 1\n"
            ),
            r#"item "cam-001": field "sku": declared more than once; each must be unique"#,
        );
        check_doc(
            "version = 1\n[[category]]\nid = \"a\"\nname = \"A\"\n[[category]]\nid = \"a\"\nname = \"A again\"\n",
            r#"category "a": field "id": declared more than once; each must be unique"#,
        );
    }

    #[test]
    fn category_errors() {
        let cases: &[(&str, &str)] = &[
            (
                "version = 1\n[[category]]\nid = \"Cameras\"\nname = \"Cameras\"\n",
                r#"category "Cameras": field "id": use 1 to 48 characters from a-z, 0-9, "_" and "-""#,
            ),
            (
                "version = 1\n[[category]]\nid = \"cameras\"\nname = \"\"\n",
                r#"category "cameras": field "name": must not be empty"#,
            ),
            (
                "version = 1\n[[category]]\nid = \"cameras\"\nname = \"Cameras\"\naccessory_categories = [\"lense\"]\n",
                r#"category "cameras": field "accessory_categories": unknown category "lense"; declare it under [[category]]"#,
            ),
            (
                "version = 1\n[[category]]\nid = \"cameras\"\nname = \"Cameras\"\naccessory_categories = [\"cameras\"]\n",
                r#"category "cameras": field "accessory_categories": a category cannot be its own accessory category; remove its own id"#,
            ),
            (
                "version = 1\n[[category]]\nid = \"cameras\"\nname = \"Cameras\"\ncolor = \"red\"\n",
                "catalog toml, line 5, column 1: unknown field `color`, expected one of `id`, `name`, `description`, `accessory_categories`",
            ),
            (
                "version = 2\n",
                r#"field "version": unsupported catalog version 2; this build reads version 1"#,
            ),
            (
                "[[category]]\nid = \"cameras\"\nname = \"Cameras\"\n",
                "catalog toml, line 1, column 1: missing field `version`",
            ),
            (
                "version = 1\n[[category]\n",
                "catalog toml, line 2, column 11: invalid table header; expected `.`, `]]`",
            ),
            (
                "version = 1\ncolour = 3\n",
                "catalog toml, line 2, column 1: unknown field `colour`, expected one of `version`, `category`, `item`",
            ),
        ];
        for (doc, expected) in cases {
            check_doc(doc, expected);
        }
    }

    /// Finds two distinct names of the given shape whose hashes collide (deterministic search).
    fn colliding<K: Ord + Copy>(
        make: impl Fn(u32) -> String,
        hash: impl Fn(&str) -> K,
    ) -> (String, String) {
        let mut seen: BTreeMap<K, String> = BTreeMap::new();
        for i in 0.. {
            let name = make(i);
            let h = hash(&name);
            if let Some(prev) = seen.get(&h) {
                return (prev.clone(), name);
            }
            seen.insert(h, name);
        }
        unreachable!()
    }

    #[test]
    fn category_hash_collisions_are_rejected() {
        let (a, b) = colliding(|i| format!("c{i}"), CategoryId::of_name);
        assert_ne!(a, b);
        let id = format!("{:?}", CategoryId::of_name(&a));
        check_doc(
            &format!(
                "version = 1\n[[category]]\nid = \"{a}\"\nname = \"A\"\n[[category]]\nid = \"{b}\"\nname = \"B\"\n"
            ),
            &format!(
                r#"category "{b}": field "id": its id {id} collides with that of category "{a}"; rename one of them"#
            ),
        );
    }

    #[test]
    fn item_hash_collisions_are_tolerated_and_reported() {
        // 32-bit hashes: search a structured space with the birthday bound (~80k names).
        let (a, b) = colliding(|i| format!("s{i:x}"), ItemId::of_sku);
        let doc = format!(
            "version = 1\n[[category]]\nid = \"cameras\"\nname = \"Cameras\"\n[[item]]\nsku = \"{a}\"\nname = \"A\"\ncategory = \"cameras\"\nprice = 1\n[[item]]\nsku = \"{b}\"\nname = \"B\"\ncategory = \"cameras\"\nprice = 1\n"
        );
        let catalog = Catalog::from_toml(&doc).expect("collisions do not reject a catalog");
        assert_eq!(catalog.id_collisions(), &[(b.clone(), a.clone())]);
        assert_eq!(catalog.item_by_sku(&a).map(Item::sku), Some(a.as_str()));
        assert_eq!(catalog.item_by_sku(&b).map(Item::sku), Some(b.as_str()));
        // by id, the earlier item wins
        assert_eq!(
            catalog.item(ItemId::of_sku(&b)).map(Item::sku),
            Some(a.as_str())
        );
    }

    #[test]
    fn caps() {
        let mut doc = String::from("version = 1\n");
        for i in 0..=MAX_CATEGORIES {
            doc.push_str(&format!("[[category]]\nid = \"c{i}\"\nname = \"C\"\n"));
        }
        check_doc(
            &doc,
            "too many categories: 1025; a catalog holds at most 1024",
        );

        let mut doc = String::from("version = 1\n[[category]]\nid = \"c\"\nname = \"C\"\n");
        for i in 0..=MAX_ITEMS {
            doc.push_str(&format!(
                "[[item]]\nsku = \"{i}\"\nname = \"I\"\ncategory = \"c\"\nprice = 1\n"
            ));
        }
        check_doc(
            &doc,
            "too many items: 100001; a catalog holds at most 100000",
        );
    }

    #[test]
    fn errors_are_structured() {
        let err = parse("[[item]]\nsku = \"a\"\nname = \"A\"\ncategory = \"x\"\nprice = 1\n")
            .expect_err("unknown category");
        assert_eq!(
            err,
            CatalogError::Invalid {
                subject: Subject::Item("a".into()),
                field: "category",
                problem: Problem::UnknownCategory("x".into()),
            }
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
                (it.id, it.category, it.in_stock)
            );
            assert_eq!(h.popularity, it.popularity);
            assert_eq!(c.hot_tags(h), &*it.tags);
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

    pub(crate) const TOKENS: &[&str] = &[
        "",
        "\"",
        "]",
        "[[item]]\n",
        "[[category]]\n",
        "=",
        "-1",
        "1e999",
        "nan",
        "99999999999",
        "\n",
        "sku = \"cam-001\"\n",
        "id = \"cameras\"\n",
        "é",
        "\u{0}",
        "{",
        "}",
        ",",
        "accessories = [\"cam-001\"]\n",
        "version = 1\n",
        "tags = [\"x\"]\n",
    ];

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        #[test]
        fn edited_documents_never_panic(
            at in 0usize..70_000,
            cut in 0usize..64,
            token in proptest::sample::select(TOKENS),
        ) {
            let text = mutate(DEMO_CATALOG, at, cut, token);
            let _ = Catalog::from_toml(&text);
        }
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
